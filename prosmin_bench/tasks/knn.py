"""Weighted k-NN classification on frozen features (DINO, Caron et al. 2021, eval_knn.py).

L2-normalise train and test features, cosine similarity, top-k neighbours, weights exp(sim / T), class votes
summed; probabilities = votes normalised to sum 1 (so NLL and ECE exist for k-NN too).

Memory: :func:`knn_topk` streams over query chunks and train-bank chunks with a running top-k; chunk sizes come
from ``max_memory``, which bounds everything the call allocates, its [N_test, k] result included (the inputs
themselves are not counted: they are the caller's, and a cached bank is a memmap read chunk by chunk with plain
file reads, so its pages never count toward the process's memory). ``benchmarks/bench_knn.py`` measures the peak
resident memory against the budget. Unlike DINO's script it works below 100 test images and for k > N_train.

Speed: after the first chunk fills the running top-k, a bank chunk only contributes the similarities above each
query's current k-th best; they are few (about k / (chunks seen) per query on average), so the merge costs a
comparison and a sparse gather instead of a top-k over the whole similarity block.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CardError, FeatureError
from ..metrics import accuracy, expected_calibration_error, fit_temperature, negative_log_likelihood, temperature_scale
from ..settings import EvalSettings
from .base import Task, TaskContext, TaskOutput, classification_samples, register_kind
from .scaling import held_out_bank_neighbours, temperature_metrics, vote_logits

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = EvalSettings.max_memory  # bytes of working memory for similarity blocks outside a run

# Working-memory model of knn_topk, in bytes (checked by tests/test_knn.py and benchmarks/bench_knn.py).
_CELL_BYTES = 5  # per similarity-block cell: float32 similarity + bool "above the running k-th best" mask
_MERGE_BYTES_PER_K = 128  # per query and neighbour: running top-k (12 B), sparse candidates, merge cat/top-k/gather
_RESULT_BYTES_PER_K = 12  # the [N_test, k] result: float32 similarity + int64 index
_MIN_BANK_CHUNK = 2048  # below this many bank rows per chunk the per-chunk overhead dominates the matmul
_FIRST_BANK_CHUNK = 1024  # rows of the first bank chunk (at least 2k): its dense top-k fills the running top-k
_VOTE_ROWS = 1024  # queries voted at a time in knn_vote (bounds its [rows, C] float64 accumulator)


class _Rows:
    """Row blocks of a feature matrix [N, D] (numpy array, ``.npy`` memmap or torch tensor) as float32 tensors.

    A read-only or shared ``.npy`` memmap (what the feature cache returns) is read with plain file reads rather
    than through its mapping: touched pages of a mapping count toward the process's resident memory until the
    kernel drops them, so streaming a bank through it would grow the RSS to the whole file whatever the budget.
    """

    def __init__(self, x: Any) -> None:
        if x.ndim != 2:
            raise FeatureError(f"Expected features of shape [N, D], but got shape {tuple(x.shape)}")
        self.x = x
        self.n, self.dim = int(x.shape[0]), int(x.shape[1])
        self.itemsize = x.element_size() if isinstance(x, torch.Tensor) else np.dtype(x.dtype).itemsize
        self._file = None
        if (isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.flags.c_contiguous
                and getattr(x, "mode", "") in ("r", "r+", "w+") and getattr(x, "filename", None)):
            self._file = open(x.filename, "rb", buffering=0)
            self._offset = int(x.offset)

    def read(self, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """Rows [start, stop) as float32 [stop - start, D] on ``device``, checked finite."""
        if self._file is not None:
            buf = np.empty((stop - start, self.dim), dtype=self.x.dtype)
            view = memoryview(buf).cast("B")
            self._file.seek(self._offset + start * self.dim * self.itemsize)
            got = 0
            while got < len(view):
                r = self._file.readinto(view[got:])
                if not r:
                    raise FeatureError(f"Feature file {self.x.filename} is shorter than its header says; delete it")
                got += r
            t = torch.from_numpy(buf)
        elif isinstance(self.x, torch.Tensor):
            t = self.x[start:stop]
        else:
            block = np.ascontiguousarray(self.x[start:stop])
            # torch cannot wrap read-only memory (a memmap slice); copying the block is within the budget
            t = torch.from_numpy(block if block.flags.writeable else block.copy())
        t = t.to(device).float()
        if not torch.isfinite(t).all():
            raise FeatureError(f"Features contain NaN or inf in rows {start}..{stop - 1}; recompute them")
        return t

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _working_bytes(q: int, b: int, dim: int, k: int, itemsize: int) -> int:
    """Bytes knn_topk holds at once with query chunk ``q`` and bank chunk ``b`` (besides its result): each
    chunk as read (``itemsize``) and as normalised float32 (bank: plus the float32 copy before normalising),
    the similarity block with its mask, and the running top-k with its merge buffers."""
    per_query = dim * (itemsize + 4) + _MERGE_BYTES_PER_K * k
    per_bank = dim * (itemsize + 8)
    return q * per_query + b * per_bank + _CELL_BYTES * q * b


def _chunk_sizes(n_query: int, n_bank: int, k: int, max_memory: int, itemsize: int = 4, *,
                 dim: int = 1) -> tuple[int, int]:
    """Query and bank chunk sizes whose working set (:func:`_working_bytes`) fits ``max_memory``.

    As many queries per chunk as fit beside a bank chunk of at least ``_MIN_BANK_CHUNK`` rows (each query chunk
    is one pass over the bank), then the largest bank chunk that fits. Below the smallest working set (one
    query, one bank row) the chunks are (1, 1), and :func:`knn_topk` refuses the budget.
    """
    budget = max(int(max_memory), 0)
    per_query = dim * (itemsize + 4) + _MERGE_BYTES_PER_K * k
    per_bank = dim * (itemsize + 8)
    b_min = max(1, min(n_bank, max(2 * k, _MIN_BANK_CHUNK)))
    q = (budget - b_min * per_bank) // (per_query + _CELL_BYTES * b_min)
    if q >= 1:
        q = min(q, n_query)
        b = min(n_bank, (budget - q * per_query) // (per_bank + _CELL_BYTES * q))
    else:
        q = 1
        b = min(n_bank, (budget - per_query) // (per_bank + _CELL_BYTES))
    return int(max(q, 1)), int(max(b, 1))


def _merge_rows(best_s: torch.Tensor, best_i: torch.Tensor, rows: torch.Tensor, cand_s: torch.Tensor,
                cand_i: torch.Tensor, k: int) -> None:
    """Merge candidates [len(rows), c] into the running top-k of ``rows``, in place."""
    top, pos = torch.cat([best_s[rows], cand_s], 1).topk(k, dim=1)
    best_i[rows] = torch.cat([best_i[rows], cand_i], 1).gather(1, pos)
    best_s[rows] = top


def _merge_heavy(best_s: torch.Tensor, best_i: torch.Tensor, sims: torch.Tensor, heavy: torch.Tensor, offset: int,
                 k: int) -> None:
    """Rows with more than k candidates in one block (a query meeting its own class in a class-sorted bank): a
    top-k of their block rows, a few rows at a time so the copy stays within the merge allowance (4 q k bytes)."""
    q, b = sims.shape
    for rows in heavy.split(max(1, q * k // b)):
        s, i = sims[rows].topk(k, dim=1)
        _merge_rows(best_s, best_i, rows, s, i + offset, k)


def _merge(best_s: torch.Tensor, best_i: torch.Tensor, sims: torch.Tensor, offset: int, k: int,
           full: bool, mask_buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a similarity block [q, b] (bank rows offset..offset+b) into the running top-k [q, k] (descending).

    Once the running top-k is ``full`` (k bank rows seen), only similarities above a query's current k-th best
    can enter. When they are few (at most k per query on average) they are gathered sparsely (rows with more
    than k of them go through a top-k of their own); otherwise the whole block goes through a top-k.
    """
    q, b = sims.shape
    dev = sims.device
    if full:
        mask = torch.gt(sims, best_s[:, -1:], out=mask_buf)
        count = int(torch.count_nonzero(mask))
        if count == 0:
            return best_s, best_i
        if count <= q * k:  # the candidate list (~44 B per candidate) stays within the merge allowance
            rows, cols = mask.nonzero(as_tuple=True)  # row-major: rows ascending
            per_row = torch.bincount(rows, minlength=q)
            heavy = torch.nonzero(per_row > k, as_tuple=True)[0]
            if len(heavy):
                _merge_heavy(best_s, best_i, sims, heavy, offset, k)
                light = per_row[rows] <= k
                rows, cols = rows[light], cols[light]
                per_row = per_row.masked_fill(per_row > k, 0)
                if len(rows) == 0:
                    return best_s, best_i
            widest = int(per_row.max())
            first = torch.cumsum(per_row, 0) - per_row
            col = torch.arange(len(rows), device=dev) - first[rows]  # position of each candidate within its row
            active = torch.nonzero(per_row, as_tuple=True)[0]
            slot = torch.empty(q, dtype=torch.long, device=dev)
            slot[active] = torch.arange(len(active), device=dev)
            cand_s = torch.full((len(active), widest), -math.inf, device=dev)
            cand_i = torch.full((len(active), widest), -1, dtype=torch.long, device=dev)
            cand_s[slot[rows], col] = sims[rows, cols]
            cand_i[slot[rows], col] = cols + offset
            _merge_rows(best_s, best_i, active, cand_s, cand_i, k)
            return best_s, best_i
    s, i = sims.topk(min(k, b), dim=1)
    top, pos = torch.cat([best_s, s], 1).topk(k, dim=1)
    return top, torch.cat([best_i, i + offset], 1).gather(1, pos)


def knn_topk(
    train_features: Any, test_features: Any, k: int, *, max_memory: int = DEFAULT_MAX_MEMORY,
    device: str | torch.device | None = None, exclude: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``k`` nearest train samples of each test sample.

    Args:
        train_features: [N_train, D]; test_features: [N_test, D] (numpy, memmap or torch; any float dtype).
        k: neighbours; more than the bank's (included) rows gives that many.
        max_memory: bytes this call may allocate, its result included (see the module docstring).
        exclude: optional bool mask [N_train]: bank rows that are never neighbours (their similarities are set to
            -inf before the merge; e.g. a held-out part of the bank queried against the rest).
    Returns:
        (sims [N_test, k'] float32 descending, idx [N_test, k'] int64) on CPU, k' = min(k, included bank rows).
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
    dev = torch.device(device) if device is not None else torch.device("cpu")
    excluded = None
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (n_train,) or exclude.all():
            raise FeatureError(f"Expected `exclude` to be a mask of {n_train} bank rows leaving at least one, but got "
                               f"shape {exclude.shape} with {int(exclude.sum())} set")
        excluded = torch.from_numpy(exclude).to(dev)
        k = min(k, n_train - int(exclude.sum()))
    k = min(k, n_train)
    bank, queries = _Rows(train_features), _Rows(test_features)
    dim, itemsize = bank.dim, max(bank.itemsize, queries.itemsize)
    result_bytes = _RESULT_BYTES_PER_K * k * n_test
    qc, bc = _chunk_sizes(n_test, n_train, k, max_memory - result_bytes, itemsize, dim=dim)
    need = result_bytes + _working_bytes(qc, bc, dim, k, itemsize)
    if need > max_memory:
        bank.close()
        queries.close()
        raise FeatureError(
            f"Expected a k-NN memory budget of at least {need} bytes for {n_test} queries (k={k}, D={dim}), but got "
            f"{max_memory}; raise --max-memory"
        )
    log.debug("k-NN plan: %d queries x %d bank rows per block, %d pass(es) over the bank, ~%.1f MiB of %.1f MiB",
              qc, bc, -(-n_test // qc), need / 2**20, max_memory / 2**20)
    all_sims = torch.empty(n_test, k)
    all_idx = torch.empty(n_test, k, dtype=torch.long)
    # One similarity buffer and one mask buffer, reused by every block (fresh large allocations page-fault).
    sims_buf = torch.empty(qc * bc, device=dev)
    mask_buf = torch.empty(qc * bc, dtype=torch.bool, device=dev)
    try:
        for qs in range(0, n_test, qc):
            qe = min(qs + qc, n_test)
            q = F.normalize(queries.read(qs, qe, dev), dim=1)
            best_s = torch.full((qe - qs, k), -math.inf, device=dev)
            best_i = torch.full((qe - qs, k), -1, dtype=torch.long, device=dev)
            # The first bank chunk is small (its full top-k fills the running top-k cheaply); each next one is at
            # most as large as what was seen, so in a shuffled bank about k/2 of its rows per query are
            # expected above the running k-th best, and the sparse merge applies.
            bs, step = 0, min(bc, max(2 * k, _FIRST_BANK_CHUNK))
            while bs < n_train:
                be = min(bs + step, n_train)
                chunk = F.normalize(bank.read(bs, be, dev), dim=1)
                sims = torch.mm(q, chunk.T, out=sims_buf[: (qe - qs) * (be - bs)].view(qe - qs, be - bs))
                del chunk
                if excluded is not None:
                    sims[:, excluded[bs:be]] = -math.inf
                mask = mask_buf[: sims.numel()].view(sims.shape)
                best_s, best_i = _merge(best_s, best_i, sims, bs, k, bs >= k, mask)
                bs, step = be, min(bc, be)
            all_sims[qs:qe] = best_s.cpu()
            all_idx[qs:qe] = best_i.cpu()
    finally:
        bank.close()
        queries.close()
    return all_sims, all_idx


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
                device: str | torch.device | None = None) -> torch.Tensor:
    """DINO weighted k-NN: probabilities [N_test, C] for test features [N_test, D] given a train bank [N_train, D].

    ``max_memory`` bounds the whole call: the probabilities and the vote buffers are set aside first, the rest
    goes to :func:`knn_topk`.

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
    sims, idx = knn_topk(train_features, test_features, k, max_memory=max_memory - vote_bytes, device=device)
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
        sims, idx = knn_topk(train.features, test.features, max(p.ks), max_memory=ctx.settings.max_memory,
                             device=ctx.device)
        metrics: dict[str, float] = {}
        extras: dict[str, Any] = {"top1_by_k": {}}
        held_out = held_out_bank_neighbours(ctx, train, test, p.ts_val_fraction, max(p.ks), self.spec.name, knn_topk)
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
