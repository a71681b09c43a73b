"""The extras the new plots read, against independent references: ROC curves against scikit-learn's ``roc_curve``
and ``roc_auc_score``; the compact and split-averaged curves' areas against the AUROCs; the error per sigma bin
against a direct numpy computation; and the OOD task's ``roc`` extras (plain and open-set, with ProSMin's predictive
scores) against the task's own AUROC metrics."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from prosmin_bench import cards
from prosmin_bench.metrics import (
    MetricArgumentError, average_roc_curves, compact_roc, ood_metrics, ood_roc_curve, uncertainty_error_bins,
)
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks.base import TaskContext, build_task, get_task_spec
from prosmin_bench.tasks.linear import SIGMA_BINS, sigma_error_metrics


def confidences(rng: np.random.Generator, n_id: int, n_ood: int, shift: float, ties: bool) -> tuple:
    c_id, c_ood = rng.normal(shift, 1.0, n_id), rng.normal(0.0, rng.uniform(0.3, 3.0), n_ood)
    return (np.round(c_id, 1), np.round(c_ood, 1)) if ties else (c_id, c_ood)


def sk(c_id: np.ndarray, c_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OOD positive scored by -confidence: the labels and scores scikit-learn gets."""
    return np.r_[np.zeros(len(c_id)), np.ones(len(c_ood))], -np.r_[c_id, c_ood]


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_is_sklearns_and_its_area_the_auroc(ties: bool) -> None:
    rng = np.random.default_rng(1)
    c_id, c_ood = confidences(rng, 200, 70, 1.0, ties)
    fpr, tpr = ood_roc_curve(c_id, c_ood)
    ref_fpr, ref_tpr, _ = roc_curve(*sk(c_id, c_ood), drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(*sk(c_id, c_ood)), abs=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ood_metrics(c_id, c_ood)["auroc"], abs=1e-12)


def test_compact_roc_has_101_points_and_the_auroc_within_1e3() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for n_id, n_ood in [(3, 2), (50, 30), (216, 144), (360, 360), (1000, 30), (10000, 2000)]:
        for shift in (-2.0, 0.0, 1.0, 3.0, 6.0):
            for ties in (False, True):
                c_id, c_ood = confidences(rng, n_id, n_ood, shift, ties)
                fpr, tpr = compact_roc(*ood_roc_curve(c_id, c_ood))
                assert fpr.shape == tpr.shape == (101,)
                assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
                assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
                worst = max(worst, abs(np.trapezoid(tpr, fpr) - roc_auc_score(*sk(c_id, c_ood))))
    assert worst < 1e-3


def test_compact_roc_points_lie_on_the_exact_curve() -> None:
    rng = np.random.default_rng(2)
    fpr, tpr = ood_roc_curve(*confidences(rng, 300, 100, 1.5, False))
    f, t = compact_roc(fpr, tpr)
    # each point is on a segment of the exact polyline: between its neighbours in both coordinates, collinear
    for x, y in zip(f, t):
        j = np.searchsorted(fpr + tpr, x + y)
        if (fpr + tpr)[j] == x + y:
            assert (x, y) == (fpr[j], tpr[j])
            continue
        a, b = np.array([fpr[j - 1], tpr[j - 1]]), np.array([fpr[j], tpr[j]])
        assert np.cross(b - a, np.array([x, y]) - a) == pytest.approx(0.0, abs=1e-12)


def test_vertical_average_of_split_curves_has_the_mean_auroc() -> None:
    rng = np.random.default_rng(3)
    curves, aurocs = [], []
    for n_id, n_ood, ties in [(216, 144, False), (217, 143, True), (100, 40, True)]:
        c_id, c_ood = confidences(rng, n_id, n_ood, rng.uniform(0, 2), ties)
        curves.append(ood_roc_curve(c_id, c_ood))
        aurocs.append(roc_auc_score(*sk(c_id, c_ood)))
    fpr, tpr = average_roc_curves(curves)
    assert np.trapezoid(tpr, fpr) == pytest.approx(np.mean(aurocs), abs=1e-12)
    # between breakpoints, the mean of the curves' linear interpolations (a point no curve has a vertical rise at)
    x = np.array([0.3137])
    expected = np.mean([np.interp(x, f, t) for f, t in curves])
    assert np.interp(x, fpr, tpr)[0] == pytest.approx(expected, abs=1e-12)
    f, t = compact_roc(fpr, tpr)
    assert abs(np.trapezoid(t, f) - np.mean(aurocs)) < 1e-3


@pytest.mark.parametrize("bad", [([0.0, 0.5, 0.4, 1.0], [0.0, 0.2, 0.6, 1.0]), ([0.0, 1.0], [0.1, 1.0]),
                                 ([0.0, 0.5], [0.0, 0.5])])
def test_a_curve_that_is_not_a_roc_curve_is_refused(bad) -> None:
    with pytest.raises(MetricArgumentError, match="Expected a ROC curve"):
        compact_roc(*bad)
    with pytest.raises(MetricArgumentError, match="Expected a ROC curve"):
        average_roc_curves([bad])


def direct_bins(u: np.ndarray, correct: np.ndarray, n_bins: int) -> list[tuple[int, float, float, float, float]]:
    """(count, error, mean, min, max) per bin, by a plain loop over the ranks."""
    ranked = sorted(range(len(u)), key=lambda i: (u[i], i))
    size, extra = divmod(len(u), n_bins)
    out, start = [], 0
    for b in range(n_bins):
        idx = ranked[start:start + size + (b < extra)]
        start += len(idx)
        out.append((len(idx), sum(not correct[i] for i in idx) / len(idx), sum(u[i] for i in idx) / len(idx),
                    min(u[i] for i in idx), max(u[i] for i in idx)))
    return out


def as_rows(bins: dict) -> np.ndarray:
    return np.array([bins[k] for k in ("count", "error", "uncertainty", "lower", "upper")], dtype=float).T


def test_uncertainty_error_bins_against_a_direct_loop() -> None:
    rng = np.random.default_rng(4)
    u = np.round(rng.gamma(2.0, 0.003, 363), 4)  # rounded: ties across bin borders
    correct = rng.random(363) > 40 * u
    bins = uncertainty_error_bins(u, correct, 10)
    assert as_rows(bins) == pytest.approx(np.array(direct_bins(u, correct, 10)), abs=1e-12)
    assert sum(bins["count"]) == 363 and bins["error"][-1] > bins["error"][0]
    # fewer samples than bins: one bin per sample
    assert uncertainty_error_bins([0.3, 0.1], [True, False], 10)["error"] == [1.0, 0.0]
    with pytest.raises(MetricArgumentError, match="`correct`"):
        uncertainty_error_bins([0.1, 0.2], [0.5, 1.0])


def test_linear_tasks_sigma_extras_hold_the_bins_of_the_probes_errors() -> None:
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, (300, 5))
    labels = rng.integers(0, 5, 300)
    sigma = rng.gamma(2.0, 0.003, 300)
    _, about = sigma_error_metrics(sigma, logits, labels)
    correct = logits.argmax(1) == labels
    got = about["bins"]
    assert len(got["count"]) == SIGMA_BINS
    assert as_rows(got) == pytest.approx(np.array(direct_bins(sigma, correct, SIGMA_BINS)), abs=1e-12)
    assert about["n_misclassified"] == round(sum(c * e for c, e in zip(got["count"], got["error"])))


# ------------------------------------------------------------------------------------- the OOD task's extras
LINEAR = """
    name = "t_roc_linear"
    kind = "linear"
    version = 1
    suite = "mini"
    main_score = "top1"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    [protocol]
    layer = "cls"
    epochs = 20
    batch_size = 64
    base_lrs = [0.3]
"""

OOD = """
    name = "t_roc"
    kind = "ood"
    version = 1
    suite = "mini"
    main_score = "auroc"
    [datasets]
    train = "digits:train"
    test = "digits:test"
    {ood}
    [protocol]
    head_task = "t_roc_linear"
    knn_k = 1
    {splits}
"""


@dataclass
class _Features:
    features: np.ndarray
    labels: np.ndarray
    key: str


@dataclass
class _Spec:
    name: str = "synthetic"
    feature_layer: str = "cls"


@dataclass
class _Model:
    spec: _Spec = field(default_factory=_Spec)
    has_predictive: bool = True
    has_projector: bool = False


def _features() -> dict[tuple[str, str], _Features]:
    """Four classes in 6-D (train 60, test 25 each) and 80 OOD images off the clusters; a predictive sigma larger
    off the training distribution (for the sigma / dispersion scores)."""
    rng = np.random.default_rng(0)
    centres = 2.0 * np.eye(6)[:4]
    out = {}
    for split, n in (("digits:train", 60), ("digits:test", 25), ("digits_o:test", 20)):
        y = np.repeat(np.arange(4), n)
        x = (centres[y] if split != "digits_o:test" else rng.normal(0, 1.5, (len(y), 6))) + rng.normal(0, 0.9,
                                                                                                          (len(y), 6))
        scale = 0.7 if split == "digits_o:test" else 0.5
        out[(split, "cls")] = _Features(x.astype(np.float32), y, f"{split}-cls")
        out[(split, "predictive_mu")] = _Features(rng.normal(0, 1, (len(y), 8)), y, f"{split}-mu")
        out[(split, "predictive_sigma")] = _Features(rng.gamma(20, scale / 20, (len(y), 8)), y, f"{split}-sigma")
    return out


def _run(tmp_path, ood: str, splits: str):
    d = tmp_path / "cards"
    d.mkdir()
    (d / "lin.toml").write_text(textwrap.dedent(LINEAR))
    (d / "ood.toml").write_text(textwrap.dedent(OOD.format(ood=ood, splits=splits)))
    cards.add_card_dir(d)
    data = _features()
    ctx = TaskContext(model=_Model(), seed=0, settings=EvalSettings(),
                      feature_fn=lambda ref, layer, preprocess=None: data[(str(ref), layer)],
                      dataset_fn=lambda ref: None)
    return build_task(get_task_spec("t_roc")).run(ctx)


@pytest.mark.parametrize("mode", ["ood set", "open set"])
def test_ood_tasks_roc_extras_have_the_areas_of_their_auroc_metrics(tmp_path, mode: str) -> None:
    if mode == "ood set":
        out = _run(tmp_path, 'ood = "digits_o:test"', "")
    else:
        out = _run(tmp_path, "", "class_splits = [[0, 1], [3, 1, 2]]")
        assert len(out.extras["open_set"]["splits"]) == 2
    roc = out.extras["roc"]
    assert set(roc) == {"msp", "maxlogit", "energy", "knn", "sigma", "dispersion"}
    for score, curve in roc.items():
        assert len(curve["fpr"]) == len(curve["tpr"]) == 101
        metric = "auroc" if score == "msp" else f"{score}_auroc"  # for open set, the mean over the splits
        assert np.trapezoid(curve["tpr"], curve["fpr"]) == pytest.approx(out.metrics[metric], abs=1e-3), score
    if mode == "ood set":  # the constructed sigma is larger on the OOD images
        assert out.metrics["sigma_auroc"] > 0.8
