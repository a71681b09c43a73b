"""Open-set recognition splits for the ``ood`` kind (protocol field ``class_splits``): near-OOD from held-out classes.

OpenOOD's "osr" benchmarks (Yang et al., NeurIPS 2022 Datasets and Benchmarks; github.com/Jingkang50/OpenOOD)
train a classifier on some classes of a dataset and score the test images of the other classes as OOD, averaging
over several class splits: MNIST-6/4 has five, ``configs/datasets/osr_mnist6/mnist6_seed{1..5}.yml`` (line 31:
``test_mnist_6_id_seed1.txt``, the ID test images) with ``mnist6_seed{1..5}_osr.yml`` (line 23:
``test_mnist_4_ood_seed1.txt``, the OOD ones); the class lists ship in OpenOOD's downloaded image lists, not in the
repository. The five MNIST splits of the open-set literature (Neal et al., ECCV 2018, as published by Vaze et al.,
"Open-Set Recognition: a Good Closed-Set Classifier is All You Need", ICLR 2022, in
github.com/sgvaze/osr_closed_set_all_you_need ``data/open_set_splits/osr_splits.py`` lines 2-8) list the six known
digits of each split; ``tasks/digits_o.toml`` uses those five lists (scikit-learn's digits have MNIST's classes
0-9, label = digit).

Every seed evaluates every split and reports the mean over splits (OpenOOD reports the mean over its five), so
seeds differ only in the head's training randomness and held-out draw. A split lists its ID classes as label
indices of the training split; the test images of every other class are the OOD set.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..errors import CardError, DataError


def check_class_splits(card: str, splits: Any) -> None:
    """CardError unless ``splits`` is a non-empty list of lists of at least two distinct non-negative class
    indices each."""
    field = f"Card {card!r}: protocol field 'class_splits'"
    if not isinstance(splits, (list, tuple)) or not splits:
        raise CardError(f"{field} must be a non-empty list of class lists, e.g. [[0, 1, 2], [3, 4, 5]], "
                        f"but got {splits!r}")
    for i, split in enumerate(splits):
        if not isinstance(split, (list, tuple)) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool) and c >= 0 for c in split):
            raise CardError(f"{field}: split {i} must be a list of non-negative class indices (integers), but got "
                            f"{split!r}")
        if len(split) < 2:
            raise CardError(f"{field}: split {i} must list at least 2 ID classes (the softmax of one class is "
                            f"always 1), but got {list(split)!r}")
        if len(set(split)) != len(split):
            raise CardError(f"{field}: split {i} lists a class twice: {list(split)!r}")


def split_rows(labels: np.ndarray, id_classes: Sequence[int], what: str) -> tuple[np.ndarray, np.ndarray]:
    """(ID rows, OOD rows) of a test set with ``labels`` [N]: the images of ``id_classes`` and of every other class.
    DataError when either side is empty."""
    is_id = np.isin(labels, np.asarray(id_classes, dtype=np.int64))
    id_rows, ood_rows = np.flatnonzero(is_id), np.flatnonzero(~is_id)
    if not len(id_rows):
        raise DataError(f"{what}: no test image belongs to the ID classes {list(id_classes)}; check class_splits")
    if not len(ood_rows):
        raise DataError(f"{what}: the ID classes {list(id_classes)} cover every test image, so no class is held "
                        "out as OOD; list fewer classes in the split")
    return id_rows, ood_rows


def remap_labels(labels: np.ndarray, id_classes: Sequence[int]) -> np.ndarray:
    """Labels of ID images [N] as head outputs: class ``id_classes[i]`` -> i (``fit_linear_probe(classes=...)``)."""
    pos = {int(c): i for i, c in enumerate(id_classes)}
    return np.array([pos[int(y)] for y in labels], dtype=np.int64)


def _auroc(confidence: np.ndarray, is_ood: np.ndarray) -> float:
    """AUROC with OOD positive scored by -confidence (``metrics.ood_metrics``' convention): Mann-Whitney U with
    mid-ranks, P(conf_ood < conf_id) + 0.5 P(tie)."""
    ranks = rankdata(-confidence, method="average")
    n_pos = int(np.count_nonzero(is_ood))
    n_neg = is_ood.shape[0] - n_pos
    return (float(np.sum(ranks[is_ood])) - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def split_mean_auroc_replicates(confidences: Sequence[np.ndarray], is_ood: Sequence[np.ndarray], *, n_boot: int,
                                seed: int) -> np.ndarray:
    """Bootstrap replicates [n_boot] of the split-mean AUROC over the test images.

    ``confidences[j]`` [N] and ``is_ood[j]`` [N] (bool) are split j's confidence and OOD mask for every test image.
    Replicate b draws N image indices ``rng.integers(0, N, N)`` (``rng = numpy.random.default_rng(seed)``), the same
    for every split, and averages the splits' AUROCs on them; a draw without an ID or an OOD image of some split
    leaves that split out of the mean. The draws depend on N and ``seed`` alone, so two models (and two seeds) share
    them: the "replicates" samples of ``metrics.ScoreSamples``.
    """
    n = int(confidences[0].shape[0])
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        values = []
        for conf, ood in zip(confidences, is_ood):
            o = ood[idx]
            if 0 < int(np.count_nonzero(o)) < n:
                values.append(_auroc(conf[idx], o))
        out[b] = float(np.mean(values)) if values else float("nan")
    return out
