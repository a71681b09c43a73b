"""Weighted k-NN classification on frozen features (DINO, Caron et al. 2021, eval_knn.py).

L2-normalise train and test features, cosine similarity, top-k neighbours, weights exp(sim / T), class votes
summed; probabilities = votes normalised to sum 1 (so NLL and ECE exist for k-NN too).

The neighbour search (exact, under a memory budget: a dense path while the bank fits, else streaming) is
:func:`knn_search.knn_topk` (``--knn-backend faiss``: faiss's exact index instead, ``knn_faiss.py``). Unlike DINO's
script it works below 100 test images and for k > N_train.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import CardError, FeatureError
from ..metrics import accuracy, expected_calibration_error, fit_temperature, negative_log_likelihood, temperature_scale
from .base import Task, TaskContext, TaskOutput, classification_samples, register_kind
from .knn_search import (  # noqa: F401  (the search's names, importable from here as before)
    _RESULT_BYTES_PER_K, DEFAULT_MAX_MEMORY, TopkPlan, _chunk_sizes, _working_bytes, knn_plan, knn_topk,
)
from .scaling import held_out_bank_neighbours, temperature_metrics, vote_logits

log = logging.getLogger(__name__)

_VOTE_ROWS = 1024  # queries voted at a time in knn_vote (bounds its [rows, C] float64 accumulator)


def knn_vote(sims: torch.Tensor, idx: torch.Tensor, train_labels: Any, k: int, temperature: float,
             num_classes: int) -> torch.Tensor:
    """Vote probabilities [N_test, C] from the first ``k`` of precomputed neighbours (sims descending)."""
    labels = _as_tensor(train_labels).long()
    out = torch.empty(sims.shape[0], num_classes)
    for r in range(0, sims.shape[0], _VOTE_ROWS):
        s, i = sims[r : r + _VOTE_ROWS, :k], idx[r : r + _VOTE_ROWS, :k]
        weights = (s.double() / temperature).exp()  # DINO: exp(sim / T); sim <= 1 so no overflow for T >= 0.01
        votes = torch.zeros(s.shape[0], num_classes, dtype=torch.float64)
        votes.scatter_add_(1, labels[i], weights)
        out[r : r + _VOTE_ROWS] = (votes / votes.sum(dim=1, keepdim=True)).float()
    return out


def _as_tensor(x: Any, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device) if device is not None else t


def knn_predict(train_features: Any, train_labels: Any, test_features: Any, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, *, max_memory: int = DEFAULT_MAX_MEMORY,
                device: str | torch.device | None = None, path: str | None = None,
                backend: str = "torch") -> torch.Tensor:
    """DINO weighted k-NN: probabilities [N_test, C] for test features [N_test, D] given a train bank [N_train, D].

    ``max_memory`` bounds the whole call: the probabilities and the vote buffers are set aside first, the rest
    goes to :func:`knn_topk`, which searches densely when that fits and streams otherwise (``path`` = "dense" or
    "stream" forces one; ``backend="faiss"``: the same neighbours from faiss, ``knn_faiss.py``).

    >>> import torch
    >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> probs = knn_predict(train, torch.tensor([0, 0, 1]), torch.tensor([[1.0, 0.05]]), k=2)
    >>> probs.argmax(1).tolist(), round(float(probs.sum()), 6)
    ([0], 1.0)
    """
    if not isinstance(k, int) or k < 1:
        raise FeatureError(f"Expected `k` to be a positive integer, but got {k!r}")
    if not temperature > 0:
        raise FeatureError(f"Expected `temperature` to be positive, but got {temperature!r}")
    labels = _as_tensor(train_labels).long()
    if labels.shape[0] != train_features.shape[0]:
        raise FeatureError(f"Expected {train_features.shape[0]} train labels, but got {labels.shape[0]}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    n_test = int(test_features.shape[0])
    kk = min(k, int(train_features.shape[0]))
    vote_bytes = 4 * n_test * num_classes + min(n_test, _VOTE_ROWS) * (8 * num_classes + 28 * kk)
    sims, idx = knn_topk(train_features, test_features, k, max_memory=max_memory - vote_bytes, device=device,
                         path=path, backend=backend)
    return knn_vote(sims, idx, labels, sims.shape[1], temperature, num_classes)


@register_kind("knn")
class KNNTask(Task):
    """k-NN on frozen features; metrics per k: ``top1_k{k}``, ``nll_k{k}``, ``ece_k{k}``, and after temperature
    scaling ``nll_ts_k{k}``, ``ece_ts_k{k}`` with the fitted ``temperature_k{k}`` (the scaling's T, not the vote
    temperature of the protocol; fitted on a held-out part of the bank, ``tasks/scaling.py``); main k = 20."""

    roles = ("train", "test")

    @dataclass(frozen=True)
    class Params:
        ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO eval_knn.py nb_knn
        temperature: float = 0.07  # DINO eval_knn.py
        layer: str = "cls"  # final-norm CLS of the evaluated backbone (docs/protocols.md k-NN)
        n_bins: int = 15  # ECE bins (Guo et al. 2017)
        ts_val_fraction: float = 0.1  # held-out part of the bank for the temperature (the linear probe's split)

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not 0 < params.ts_val_fraction < 1:
            raise CardError(f"Card {spec.card!r}: protocol field 'ts_val_fraction' must be in (0, 1)")
        if not params.ks or any(not isinstance(k, int) or k < 1 for k in params.ks):
            raise CardError(f"Card {spec.card!r}: protocol field 'ks' must be positive integers, got {params.ks}")
        if not params.temperature > 0:
            raise CardError(f"Card {spec.card!r}: protocol field 'temperature' must be > 0")

    def metric_names(self) -> list[str]:
        return [f"{m}_k{k}" for k in self.params.ks
                for m in ("top1", "nll", "ece", "nll_ts", "ece_ts", "temperature")]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        train = ctx.features(self.spec.refs["train"], p.layer)
        test = ctx.features(self.spec.refs["test"], p.layer)
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        search = dict(max_memory=ctx.settings.max_memory, device=ctx.device, backend=ctx.settings.knn_backend)
        sims, idx = knn_topk(train.features, test.features, max(p.ks), **search)
        metrics: dict[str, float] = {}
        # the search's plan (torch's dense or streaming path, or faiss_cpu / faiss_gpu; block sizes): it follows
        # --max-memory and --knn-backend, the numbers do not (up to float rounding and the order of exact ties)
        plan = knn_plan(train.features, test.features, max(p.ks), **search)
        extras: dict[str, Any] = {"top1_by_k": {}, "search": plan.as_dict()}
        held_out = held_out_bank_neighbours(ctx, train, test, p.ts_val_fraction, max(p.ks), self.spec.name,
                                            functools.partial(knn_topk, backend=ctx.settings.knn_backend))
        samples = None
        for k in p.ks:
            probs = knn_vote(sims, idx, train.labels, min(k, sims.shape[1]), p.temperature, num_classes).numpy()
            metrics[f"top1_k{k}"] = accuracy(probs, test.labels)
            metrics[f"nll_k{k}"] = negative_log_likelihood(probs, test.labels)
            metrics[f"ece_k{k}"] = expected_calibration_error(probs, test.labels, n_bins=p.n_bins)
            extras["top1_by_k"][str(k)] = metrics[f"top1_k{k}"]
            if held_out is not None:
                vsims, vidx, y_val, tsims, tidx = held_out  # neighbours in the bank less its held-out part
                val_probs = knn_vote(vsims, vidx, train.labels, min(k, vsims.shape[1]), p.temperature, num_classes)
                t = fit_temperature(vote_logits(val_probs.numpy()), y_val)
                reduced = knn_vote(tsims, tidx, train.labels, min(k, tsims.shape[1]), p.temperature, num_classes)
                metrics.update(temperature_metrics(temperature_scale(vote_logits(reduced.numpy()), t), test.labels, t,
                                                   p.n_bins, f"_k{k}"))
            if self.spec.main_score.endswith(f"_k{k}"):  # the main k's per-image values (the record's ci95)
                samples = classification_samples(self.spec.main_score, probs, test.labels)
        return TaskOutput(metrics, extras, samples)
