"""Calibration after temperature scaling in the probe tasks (Guo et al., ICML 2017, Sec. 4.2): the records'
``nll_ts``, ``ece_ts`` and ``temperature`` (k-NN: per k, ``nll_ts_k20`` ...), T from ``metrics.fit_temperature``.

T is always fitted on held-out data, never on test:

- linear probe: the held-out split of the lr selection, logits of the head trained on the fit part at the chosen lr;
  nll_ts / ece_ts are that head's on test (``tasks/linear.py``): Guo et al.'s setup (train, fit T on validation,
  evaluate on test, one model throughout);
- k-NN: a stratified ``ts_val_fraction`` of the train bank (seeded) queried against the rest of the bank (its rows
  excluded from the neighbours); T per k on :func:`vote_logits` of its vote probabilities; nll_ts / ece_ts are those
  of the test votes against the same reduced bank (one classifier throughout, as for the linear probe);
- low-shot: the out-of-fold decision functions of the cross-validation folds at the chosen lambda, pooled; applied to
  the classifier refit on the whole subset (``tasks/lowshot.py``): the subsets are too small to leave a part out of
  the final classifier, so T is fitted for the folds' classifiers (each on about 80% of the subset).

A first version applied T fitted on held-out data of the fit-part head (or reduced bank) to the final head (whole
bank), and the "calibrated" numbers came out worse than the raw ones for most micro models (transfer_lfw_linear:
NLL 0.19 -> 1.22 at T = 0.35): a temperature is a property of one model, not of a protocol.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..metrics import expected_calibration_error, negative_log_likelihood
from ..metrics.classification import NLL_CLAMP
from .base import TaskContext
from .probes import stratified_holdout

log = logging.getLogger(__name__)


def vote_logits(probs: np.ndarray) -> np.ndarray:
    """Logits [N, C] of k-NN vote probabilities [N, C]: log p, zeros clipped first at 1e-12, the floor of
    ``negative_log_likelihood`` (so softmax of them at T = 1 is p up to that floor, renormalised)."""
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), NLL_CLAMP))


def temperature_metrics(probs: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int = 15,
                        suffix: str = "") -> dict[str, float]:
    """``nll_ts``, ``ece_ts`` (the same ``n_bins`` bins as ``ece``) and ``temperature`` of test probabilities [N, C]
    softmax(logits / T), T fitted on held-out data; ``suffix`` names the variant (``"_k20"``: ``nll_ts_k20``)."""
    return {f"nll_ts{suffix}": negative_log_likelihood(probs, labels),
            f"ece_ts{suffix}": expected_calibration_error(probs, labels, n_bins=n_bins),
            f"temperature{suffix}": float(temperature)}


def held_out_bank_neighbours(ctx: TaskContext, train: Any, test: Any, fraction: float, k: int, task: str,
                             knn_topk: Callable[..., tuple[Any, Any]]) -> tuple[Any, Any, np.ndarray, Any, Any] | None:
    """For the temperature of the k-NN bank ``train`` with a stratified held-out ``fraction`` (seeded by
    ``ctx.seed``) left out of it: the ``k`` nearest neighbours (``knn.knn_topk``, passed in: knn imports this
    module) of the held-out images among the rest, their labels, and the test images' neighbours among the same
    rest: (val sims, val idx, val labels, test sims, test idx); None when no class has two images."""
    y = np.asarray(train.labels)
    _, val_idx = stratified_holdout(y, fraction, ctx.seed)
    if len(val_idx) == 0:
        log.warning("%s: no class has two bank images to hold out; nll_ts / ece_ts left out", task)
        return None
    held = np.zeros(len(y), dtype=bool)
    held[val_idx] = True
    kw = dict(max_memory=ctx.settings.max_memory, device=ctx.device, exclude=held)
    sims, idx = knn_topk(train.features, np.asarray(train.features[val_idx]), k, **kw)
    test_sims, test_idx = knn_topk(train.features, test.features, k, **kw)
    return sims, idx, y[val_idx], test_sims, test_idx
