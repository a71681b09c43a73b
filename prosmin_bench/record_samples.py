"""A record's main score per test sample: the pooled 95% interval (``ResultRecord.ci95``) and the compact stored
form (``ResultRecord.samples``) from which the leaderboard runs its paired tests without any other file.

Stored form (checked by ``record_schema``)::

    {"metric": <main score>, "kind": "mean" | "auroc" | "replicates", "encoding": "bits" | "float16" | "float32",
     "n": [N] (mean, replicates) or [N_id, N_ood] (auroc),
     "per_seed": {"<seed>": [<base64 of each group's values>], ...}}

Encodings: ``bits`` for 0/1 values (correctness; numpy.packbits, big-endian bit order, ceil(N / 8) bytes);
``float16`` for other per-sample means (an image's share of the mCE: 11 significant bits, so the mean of N values
moves by far less than any difference the paired test can resolve); ``float32`` (little-endian) for confidences
(whose ties the AUROC counts, which float16 would create near 1) and bootstrap replicates. Sizes for the 50,000
ImageNet val images, per seed: top-1 correctness 6.25 kB (8.3 kB in base64); ImageNet-C's mCE shares 100 kB (133 kB);
ImageNet-O's 10,000 ID + 2,000 OOD confidences 48 kB (64 kB).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .metrics import MetricArgumentError, ScoreSamples, pooled_bootstrap_ci
from .metrics.bootstrap import DEFAULT_N_BOOT, DEFAULT_SEED
from .record_schema import SAMPLE_ENCODINGS

log = logging.getLogger(__name__)

#: The largest magnitude float16 holds; per-sample means beyond it are stored as float32.
_FLOAT16_MAX = 65504.0


def _encoding(s: ScoreSamples) -> str:
    if s.kind != "mean":
        return "float32"
    v = s.values
    if np.all((v == 0.0) | (v == 1.0)):
        return "bits"
    return "float16" if float(np.max(np.abs(v))) <= _FLOAT16_MAX else "float32"


def _pack(values: np.ndarray, encoding: str) -> str:
    if encoding == "bits":
        raw = np.packbits(values.astype(bool)).tobytes()
    else:
        raw = values.astype("<f2" if encoding == "float16" else "<f4").tobytes()
    return base64.b64encode(raw).decode("ascii")


def _unpack(text: str, encoding: str, n: int) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    if encoding == "bits":
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:n].astype(np.float64)
    return np.frombuffer(raw, dtype="<f2" if encoding == "float16" else "<f4").astype(np.float64)


def _groups(s: ScoreSamples) -> list[np.ndarray]:
    """The arrays [S, n_g] of ``s``, one per group (ID and OOD for "auroc")."""
    return [s.id, s.ood] if s.kind == "auroc" else [s.values]  # type: ignore[list-item]


def encode(samples: ScoreSamples, seeds: Sequence[int]) -> dict[str, Any]:
    """The stored form of ``samples`` (one row per seed of ``seeds``, in order)."""
    encoding = _encoding(samples)
    assert encoding in SAMPLE_ENCODINGS[samples.kind]
    groups = _groups(samples)
    return {
        "metric": samples.metric, "kind": samples.kind, "encoding": encoding, "n": list(samples.sizes),
        "per_seed": {str(seed): [_pack(g[i], encoding) for g in groups] for i, seed in enumerate(seeds)},
    }


def decode(stored: dict[str, Any], seeds: Sequence[int]) -> ScoreSamples:
    """The ScoreSamples of a stored form checked by ``record_schema`` (rows in the order of ``seeds``)."""
    enc, n = stored["encoding"], stored["n"]
    rows = [[_unpack(t, enc, n[g]) for g, t in enumerate(stored["per_seed"][str(seed)])] for seed in seeds]
    if stored["kind"] == "auroc":
        return ScoreSamples.auroc(stored["metric"], np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
    make = ScoreSamples.mean if stored["kind"] == "mean" else ScoreSamples.replicates
    return make(stored["metric"], np.stack([r[0] for r in rows]))


def main_score_interval(main_score: str, seeds: Sequence[int], parts: Sequence[ScoreSamples | None],
                        ) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``(ci95, samples)`` of a record from each seed's TaskOutput.samples: the percentile interval of the main
    score pooling the test-image and the seed spread (``metrics.pooled_bootstrap_ci``, DEFAULT_N_BOOT replicates,
    DEFAULT_SEED) and the stored form; ``({}, {})`` when a seed has no samples of the main score (logged)."""
    if not parts or any(p is None for p in parts):
        return {}, {}
    wrong = sorted({p.metric for p in parts if p is not None and p.metric != main_score})
    if wrong:
        log.warning("per-sample values describe %s, not the main score %s: no ci95", wrong, main_score)
        return {}, {}
    try:
        stacked = ScoreSamples.stack([p for p in parts if p is not None])
        low, high = pooled_bootstrap_ci(stacked, n_boot=DEFAULT_N_BOOT, seed=DEFAULT_SEED)
    except MetricArgumentError as exc:  # e.g. seeds evaluated on test sets of different sizes
        log.warning("no ci95 for %s: %s", main_score, exc)
        return {}, {}
    return {main_score: [low, high]}, encode(stacked, seeds)
