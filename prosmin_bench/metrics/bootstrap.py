"""Percentile-bootstrap confidence intervals of a score from its per-sample values (Efron & Tibshirani, "An
Introduction to the Bootstrap", 1993, ch. 13: the percentile interval).

A score is described by :class:`ScoreSamples`, one row per seed (run) and one column per test sample:

- ``"mean"``: values [S, N] whose row mean is the score (0/1 correctness for top-1 accuracy, an image's share of
  the mCE, ...);
- ``"auroc"``: ID confidences [S, N_id] and OOD confidences [S, N_ood] whose AUROC (OOD positive, scored by
  -confidence, as :func:`prosmin_bench.metrics.ood_metrics`) is the score;
- ``"replicates"``: [S, B] bootstrap replicates of a statistic that is not a mean over samples (the effective rank),
  computed by its owner with resampling draws shared by all seeds.

Every interval is the percentile interval: with B replicates theta*_1..B sorted and alpha = (1 - level) / 2, the
``ceil(B alpha)``-th and ``ceil(B (1 - alpha))``-th smallest (E&T, Sec. 13.3: the B alpha-th value when B alpha
is a whole number, 25th and 975th of 1000 at 95%). Draws come from ``numpy.random.default_rng(seed)`` in a
documented order, so an interval is reproducible from its inputs alone.

- :func:`bootstrap_ci`: the mean of one sample [N]; replicate b draws N indices ``rng.integers(0, N, N)``.
- :func:`pooled_bootstrap_ci`: a score over S seeds, pooling the test-sample and the seed spread. Replicate b draws
  the sample indices once for all seeds (for ``"auroc"`` the ID, then the OOD indices: a stratified resample that
  keeps both group sizes; none for ``"replicates"``, which uses column b mod B), then, when S > 1, S seed indices
  ``rng.integers(0, S, S)``, and averages the per-seed statistic over the drawn seeds.
- :func:`paired_bootstrap_ci`: the difference between two models' scores on the same test samples. Replicate b
  draws the sample indices once for both models, then each model's seed indices (first ``a``, then ``b``; none for
  a model with one seed), and takes the difference of the two averaged statistics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from prosmin_bench.metrics import _ranking
from prosmin_bench.metrics._checks import (
    MetricArgumentError, as_float_array, positive_int, real_in_range, to_numpy,
)

#: Replicates per interval. Percentile intervals read the tails of the bootstrap distribution, so they need about
#: B = 1000 replicates where 25-200 suffice for a standard error (Efron & Tibshirani 1993, Sec. 6.4 and ch. 13-14).
DEFAULT_N_BOOT = 1000
#: The generator seed of every interval the suite records or shows: intervals are a function of the data alone.
DEFAULT_SEED = 0
#: The kinds of :class:`ScoreSamples`.
KINDS = ("mean", "auroc", "replicates")


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 2**32 - 1:
        raise MetricArgumentError(f"Expected `seed` to be an integer in [0, 4294967295], but got {value!r}")
    return int(value)


def _rows(value: Any, name: str) -> np.ndarray:
    """``value`` [N] (one seed) or [S, N] as a finite float64 array [S, N]."""
    ndim = 1 if to_numpy(value, name).ndim == 1 else 2
    out = as_float_array(value, name, ndim=ndim)
    return out[None, :] if ndim == 1 else out


@dataclass(frozen=True, eq=False)
class ScoreSamples:
    """Per-sample values of the score ``metric`` over S seeds (see the module docstring for the kinds).

    Build with :meth:`mean`, :meth:`auroc` or :meth:`replicates` (a 1-D input is one seed) and join seeds with
    :meth:`stack`.
    """

    metric: str
    kind: str
    values: np.ndarray | None = None  # "mean": [S, N]; "replicates": [S, B]
    id: np.ndarray | None = None  # "auroc": [S, N_id]
    ood: np.ndarray | None = None  # "auroc": [S, N_ood]

    @classmethod
    def mean(cls, metric: str, values: Any) -> ScoreSamples:
        """Values [N] or [S, N] whose mean over the N samples is ``metric`` (per seed)."""
        return cls(metric, "mean", values=_rows(values, "values"))

    @classmethod
    def auroc(cls, metric: str, id_confidence: Any, ood_confidence: Any) -> ScoreSamples:
        """ID confidences [N_id] or [S, N_id] and OOD ones [N_ood] or [S, N_ood] whose AUROC is ``metric``."""
        id_c, ood_c = _rows(id_confidence, "id_confidence"), _rows(ood_confidence, "ood_confidence")
        if id_c.shape[0] != ood_c.shape[0]:
            raise MetricArgumentError(f"Expected as many seeds of `id_confidence` as of `ood_confidence`, but got "
                                      f"{id_c.shape[0]} and {ood_c.shape[0]}")
        return cls(metric, "auroc", id=id_c, ood=ood_c)

    @classmethod
    def replicates(cls, metric: str, values: Any) -> ScoreSamples:
        """Bootstrap replicates [B] or [S, B] of ``metric``, drawn with the same resampling for every seed."""
        return cls(metric, "replicates", values=_rows(values, "values"))

    @property
    def n_seeds(self) -> int:
        return int((self.id if self.kind == "auroc" else self.values).shape[0])  # type: ignore[union-attr]

    @property
    def sizes(self) -> tuple[int, ...]:
        """Samples per seed: (N,) for "mean", (N_id, N_ood) for "auroc", (B,) for "replicates"."""
        if self.kind == "auroc":
            return (int(self.id.shape[1]), int(self.ood.shape[1]))  # type: ignore[union-attr]
        return (int(self.values.shape[1]),)  # type: ignore[union-attr]

    def point(self) -> np.ndarray:
        """The score of each seed [S] from its samples (for "replicates", the mean of each seed's replicates)."""
        if self.kind == "auroc":
            return np.array([_auroc(self.id[s], self.ood[s]) for s in range(self.n_seeds)])  # type: ignore[index]
        return self.values.mean(axis=1)  # type: ignore[union-attr]

    @staticmethod
    def stack(parts: Sequence[ScoreSamples]) -> ScoreSamples:
        """The seeds of ``parts`` (same metric, kind and sizes) as one ScoreSamples, in order."""
        if not parts:
            raise MetricArgumentError("Expected `parts` to hold at least one ScoreSamples, but got none")
        first = parts[0]
        for p in parts[1:]:
            if (p.metric, p.kind, p.sizes) != (first.metric, first.kind, first.sizes):
                raise MetricArgumentError(
                    f"Expected every seed's samples to describe {first.metric!r} ({first.kind}) with sizes "
                    f"{first.sizes}, but got {p.metric!r} ({p.kind}) with sizes {p.sizes}")
        if first.kind == "auroc":
            return ScoreSamples(first.metric, "auroc", id=np.concatenate([p.id for p in parts]),
                                ood=np.concatenate([p.ood for p in parts]))
        return ScoreSamples(first.metric, first.kind, values=np.concatenate([p.values for p in parts]))


def _auroc(id_conf: np.ndarray, ood_conf: np.ndarray) -> float:
    scores = np.concatenate([id_conf, ood_conf])
    is_ood = np.concatenate([np.zeros(id_conf.shape[0], bool), np.ones(ood_conf.shape[0], bool)])
    return _ranking.auroc(-scores, is_ood)


def _check(samples: Any, name: str) -> ScoreSamples:
    if not isinstance(samples, ScoreSamples) or samples.kind not in KINDS:
        raise MetricArgumentError(f"Expected `{name}` to be a ScoreSamples of kind {list(KINDS)}, but got {samples!r}")
    return samples


def _seed_statistics(s: ScoreSamples, draws: list[np.ndarray], b: int) -> np.ndarray:
    """The statistic of every seed of ``s`` [S] on the sample indices ``draws`` (replicate ``b``)."""
    if s.kind == "mean":  # add.reduce / n is what ndarray.mean computes, without its per-call overhead
        return np.add.reduce(s.values[:, draws[0]], axis=1) / draws[0].shape[0]  # type: ignore[index]
    if s.kind == "auroc":
        return np.array([_auroc(s.id[j, draws[0]], s.ood[j, draws[1]])  # type: ignore[index]
                         for j in range(s.n_seeds)])
    return s.values[:, b % s.values.shape[1]]  # type: ignore[index, union-attr]


def _over_seeds(stats: np.ndarray, rng: np.random.Generator) -> float:
    n = stats.shape[0]
    return float(stats[0] if n == 1 else np.add.reduce(stats[rng.integers(0, n, n)]) / n)


def _replicates(models: Sequence[ScoreSamples], n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, len(models)]: each replicate's seed-averaged statistic of every model on shared sample draws."""
    rng = np.random.default_rng(seed)
    sizes = () if models[0].kind == "replicates" else models[0].sizes
    out = np.empty((n_boot, len(models)))
    for b in range(n_boot):
        draws = [rng.integers(0, n, n) for n in sizes]
        for m, s in enumerate(models):
            out[b, m] = _over_seeds(_seed_statistics(s, draws, b), rng)
    return out


#: Slack on B * alpha before rounding up: (1 - 0.95) / 2 is 0.025000000000000022 in floating point, and B * alpha
#: must still give the 25th of 1000 replicates, not the 26th.
_RANK_SLACK = 1e-9


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The ceil(B alpha)-th and ceil(B (1 - alpha))-th smallest replicates (E&T 1993, Sec. 13.3)."""
    ordered = np.sort(replicates)
    b = ordered.shape[0]
    alpha = (1.0 - level) / 2.0
    rank = lambda q: min(max(math.ceil(b * q - _RANK_SLACK), 1), b)  # noqa: E731
    return float(ordered[rank(alpha) - 1]), float(ordered[rank(1.0 - alpha) - 1])


def _options(n_boot: Any, level: Any, seed: Any) -> tuple[int, float, int]:
    return (positive_int(n_boot, "n_boot"), real_in_range(level, "level", 0.0, 1.0, low_open=True, high_open=True),
            _seed(seed))


def bootstrap_ci(values: Any, *, n_boot: int = DEFAULT_N_BOOT, level: float = 0.95,
                 seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the mean of per-sample ``values`` [N] (E&T 1993, ch. 13).

    Replicate b is the mean of ``values[rng.integers(0, N, N)]`` with ``rng = numpy.random.default_rng(seed)``.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> low, high = bootstrap_ci(np.r_[np.zeros(50), np.ones(50)], n_boot=200)
    >>> bool(0.35 < low < 0.5 < high < 0.65)
    True
    """
    x = as_float_array(values, "values", ndim=1)
    n_boot, level, seed = _options(n_boot, level, seed)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    means = np.array([x[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
    return _interval(means, level)


def pooled_bootstrap_ci(samples: ScoreSamples, *, n_boot: int = DEFAULT_N_BOOT, level: float = 0.95,
                        seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile interval of the seed-averaged score of ``samples`` [S seeds], pooling the test-sample and the seed
    spread (draw order in the module docstring). With one seed and kind "mean" it equals :func:`bootstrap_ci`.

    >>> seeds = ScoreSamples.mean("top1", [[0.0] * 50, [1.0] * 50])  # seed 0 gets every image wrong, seed 1 right
    >>> pooled_bootstrap_ci(seeds)  # replicates 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    (0.0, 1.0)
    """
    s = _check(samples, "samples")
    n_boot, level, seed = _options(n_boot, level, seed)
    return _interval(_replicates([s], n_boot, seed)[:, 0], level)


def paired_bootstrap_ci(a: ScoreSamples, b: ScoreSamples, *, n_boot: int = DEFAULT_N_BOOT, level: float = 0.95,
                        seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile interval of score(a) - score(b) for two models evaluated on the same test samples: each replicate
    resamples the samples once for both (and each model's seeds), so what the two share cancels (E&T 1993, ch. 13;
    the paired design of Koehn, "Statistical Significance Tests for Machine Translation Evaluation", EMNLP 2004).

    An interval that contains 0 means the difference is not significant at ``level``.

    >>> a = ScoreSamples.mean("top1", [1.0] * 90 + [0.0] * 10)
    >>> b = ScoreSamples.mean("top1", [1.0] * 60 + [0.0] * 40)  # wrong on a's 10 errors and 30 more images
    >>> low, high = paired_bootstrap_ci(a, b, n_boot=200)
    >>> bool(0.15 < low < 0.3 < high < 0.45)  # 30 points better: the interval excludes 0
    True
    """
    a, b = _check(a, "a"), _check(b, "b")
    if a.kind != b.kind or a.sizes != b.sizes:
        raise MetricArgumentError(f"Expected `a` and `b` of the same kind and sizes (the same test samples), but got "
                                  f"{a.kind} {a.sizes} and {b.kind} {b.sizes}")
    n_boot, level, seed = _options(n_boot, level, seed)
    reps = _replicates([a, b], n_boot, seed)
    return _interval(reps[:, 0] - reps[:, 1], level)
