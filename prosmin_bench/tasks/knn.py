"""Weighted k-NN classification on frozen features (DINO, Caron et al. 2021, eval_knn.py).

L2-normalise train and test features, cosine similarity, top-k neighbours, weights exp(sim / T), class votes
summed; probabilities = votes normalised to sum 1 (so NLL and ECE exist for k-NN too). Streams over query chunks
and train-bank chunks with a running top-k, so memory stays bounded by ``max_memory`` bytes whatever the bank
size (unlike DINO's script, which also breaks below 100 test images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import FeatureError
from .base import Task, TaskContext, TaskOutput, register_kind

DEFAULT_MAX_MEMORY = 1 << 30  # 1 GiB of working memory for similarity blocks: fits any GPU and a laptop


def _as_tensor(x: Any, device: torch.device | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device) if device is not None else t


def _chunk_sizes(n_query: int, n_bank: int, k: int, max_memory: int, itemsize: int = 4) -> tuple[int, int]:
    """Query and bank chunk sizes so the similarity block [q, b] plus the running top-k fit ``max_memory``.

    The block needs q * b floats; a top-k over it needs about as much again (values + int64 indices of the
    merged candidates are small beside it), so q * b * itemsize * 3 <= max_memory.
    """
    budget = max(max_memory // (3 * itemsize), 1)
    q = min(n_query, max(1, int(math.sqrt(budget))), 4096)
    b = min(n_bank, max(k, budget // max(q, 1)))
    return max(q, 1), max(b, 1)


def knn_topk(
    train_features: Any, test_features: Any, k: int, *, max_memory: int = DEFAULT_MAX_MEMORY,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``k`` nearest train samples of each test sample.

    Args:
        train_features: [N_train, D]; test_features: [N_test, D] (numpy, memmap or torch; any float dtype).
    Returns:
        (sims [N_test, k] float32 descending, idx [N_test, k] int64), on CPU.
    """
    n_train = int(train_features.shape[0])
    n_test = int(test_features.shape[0])
    if n_train == 0 or n_test == 0:
        raise FeatureError(f"Expected non-empty features, but got {n_train} train and {n_test} test samples")
    if train_features.shape[1] != test_features.shape[1]:
        raise FeatureError(
            f"Expected train and test features of the same width, but got {train_features.shape[1]} and "
            f"{test_features.shape[1]}"
        )
    k = min(k, n_train)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    qc, bc = _chunk_sizes(n_test, n_train, k, max_memory)
    all_sims = torch.empty(n_test, k)
    all_idx = torch.empty(n_test, k, dtype=torch.long)
    # Normalise bank chunks once per query chunk pass: for banks that fit, pre-normalise once.
    bank_cache: list[torch.Tensor] | None = None
    bank_bytes = n_train * int(train_features.shape[1]) * 4
    if bank_bytes <= max_memory // 2:
        bank_cache = [
            torch.nn.functional.normalize(_as_tensor(train_features[s : s + bc]).float().to(dev), dim=1)
            for s in range(0, n_train, bc)
        ]
    for qs in range(0, n_test, qc):
        q = torch.nn.functional.normalize(_as_tensor(test_features[qs : qs + qc]).float().to(dev), dim=1)
        best_s = torch.full((q.shape[0], 0), -math.inf, device=dev)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=dev)
        for ci, bs in enumerate(range(0, n_train, bc)):
            bank = bank_cache[ci] if bank_cache is not None else torch.nn.functional.normalize(
                _as_tensor(train_features[bs : bs + bc]).float().to(dev), dim=1
            )
            sims = q @ bank.T  # [q, b]
            kk = min(k, sims.shape[1])
            s, i = sims.topk(kk, dim=1)
            best_s = torch.cat([best_s, s], dim=1)
            best_i = torch.cat([best_i, i + bs], dim=1)
            if best_s.shape[1] > k:
                best_s, pos = best_s.topk(k, dim=1)
                best_i = best_i.gather(1, pos)
        all_sims[qs : qs + q.shape[0]] = best_s.cpu()
        all_idx[qs : qs + q.shape[0]] = best_i.cpu()
    return all_sims, all_idx


def knn_vote(sims: torch.Tensor, idx: torch.Tensor, train_labels: Any, k: int, temperature: float,
             num_classes: int) -> torch.Tensor:
    """Vote probabilities [N_test, C] from the first ``k`` of precomputed neighbours (sims descending)."""
    labels = _as_tensor(train_labels).long()
    s, i = sims[:, :k], idx[:, :k]
    weights = (s / temperature).exp()  # DINO: exp(sim / T); sim <= 1 so no overflow in float32 for T >= 0.01
    votes = torch.zeros(s.shape[0], num_classes, dtype=torch.float64)
    votes.scatter_add_(1, labels[i], weights.double())
    return (votes / votes.sum(dim=1, keepdim=True)).float()


def knn_predict(train_features: Any, train_labels: Any, test_features: Any, k: int = 20, temperature: float = 0.07,
                num_classes: int | None = None, *, max_memory: int = DEFAULT_MAX_MEMORY,
                device: str | torch.device | None = None) -> torch.Tensor:
    """DINO weighted k-NN: probabilities [N_test, C] for test features [N_test, D] given a train bank [N_train, D].

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
    sims, idx = knn_topk(train_features, test_features, k, max_memory=max_memory, device=device)
    return knn_vote(sims, idx, labels, min(k, sims.shape[1]), temperature, num_classes)


@register_kind("knn")
class KNNTask(Task):
    """k-NN on frozen features; metrics per k: ``top1_k{k}``, ``nll_k{k}``, ``ece_k{k}``; main k = 20."""

    roles = ("train", "test")

    @dataclass(frozen=True)
    class Params:
        ks: tuple[int, ...] = (10, 20, 100, 200)  # DINO eval_knn.py nb_knn
        temperature: float = 0.07  # DINO eval_knn.py
        layer: str = "cls"  # final-norm CLS of the teacher/target backbone (PROTOCOLS.md k-NN)
        n_bins: int = 15  # ECE bins (Guo et al. 2017)

    @classmethod
    def check_params(cls, spec, params) -> None:
        from ..errors import CardError

        if not params.ks or any(not isinstance(k, int) or k < 1 for k in params.ks):
            raise CardError(f"Card {spec.card!r}: protocol field 'ks' must be positive integers, got {params.ks}")
        if not params.temperature > 0:
            raise CardError(f"Card {spec.card!r}: protocol field 'temperature' must be > 0")

    def metric_names(self) -> list[str]:
        return [f"{m}_k{k}" for k in self.params.ks for m in ("top1", "nll", "ece")]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..metrics import accuracy, expected_calibration_error, negative_log_likelihood

        p = self.params
        train = ctx.features(self.spec.datasets["train"], p.layer)
        test = ctx.features(self.spec.datasets["test"], p.layer)
        num_classes = int(max(train.labels.max(), test.labels.max())) + 1
        opts = ctx.options
        sims, idx = knn_topk(train.features, test.features, max(p.ks),
                             max_memory=getattr(opts, "max_memory", DEFAULT_MAX_MEMORY), device=ctx.device)
        metrics: dict[str, float] = {}
        extras: dict[str, Any] = {"top1_by_k": {}}
        for k in p.ks:
            probs = knn_vote(sims, idx, train.labels, min(k, sims.shape[1]), p.temperature, num_classes).numpy()
            metrics[f"top1_k{k}"] = accuracy(probs, test.labels)
            metrics[f"nll_k{k}"] = negative_log_likelihood(probs, test.labels)
            metrics[f"ece_k{k}"] = expected_calibration_error(probs, test.labels, n_bins=p.n_bins)
            extras["top1_by_k"][str(k)] = metrics[f"top1_k{k}"]
        return TaskOutput(metrics, extras)
