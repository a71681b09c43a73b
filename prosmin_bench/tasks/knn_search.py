"""Exact cosine top-k neighbour search under a memory budget (the search behind ``tasks/knn.py``).

Memory: ``max_memory`` bounds everything :func:`knn_topk` allocates, its [N_test, k] result included (the inputs
themselves are not counted: they are the caller's, and a cached bank is a memmap read chunk by chunk with plain
file reads, so its pages never count toward the process's memory). ``benchmarks/bench_knn.py`` measures the peak
resident memory against the budget.

Two paths, chosen by :func:`knn_plan` (same neighbours up to the order of exact ties at the k-th one):

- ``dense``, when the whole normalised bank and a block of at least ``_MIN_DENSE_QUERIES`` queries x the whole bank
  fit: one similarity block and one top-k per query chunk. Fastest while it fits (``benchmarks/bench_knn.py`` at
  50k x 384, one thread: 1.58 s against 2.32 s streaming with 2k queries and k = 200, 5.5 s against 6.2 s with 10k
  queries and k = 20).
- ``stream``, for banks that do not fit: bank chunks merged into a running top-k. After the first chunk fills it, a
  chunk only contributes the similarities above each query's current k-th best; they are few (about k / (chunks
  seen) per query on average), so the merge costs a comparison and a sparse gather instead of a top-k over the whole
  similarity block.

``backend="faiss"`` (``--knn-backend faiss``) runs the same search with faiss instead: :mod:`.knn_faiss`.
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

from .. import progress
from ..errors import FeatureError
from ..settings import KNN_BACKENDS, EvalSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = EvalSettings.max_memory  # bytes of working memory for similarity blocks outside a run
PATHS = ("dense", "stream")

# Working-memory model of knn_topk, in bytes (checked by tests/test_knn.py and benchmarks/bench_knn.py).
_CELL_BYTES = 5  # per streaming similarity-block cell: float32 similarity + bool "above the running k-th best" mask
_MERGE_BYTES_PER_K = 128  # per query and neighbour: running top-k (12 B), sparse candidates, merge cat/top-k/gather
_RESULT_BYTES_PER_K = 12  # the [N_test, k] result: float32 similarity + int64 index
#: per bank row and thread: torch's CPU top-k copies each row into (value, int64 index) pairs
#: (pytorch aten/src/ATen/native/TopKImpl.h, ``std::vector<elem_t> queue(dim_size)``)
_TOPK_ROW_BYTES = 16
_MIN_BANK_CHUNK = 2048  # below this many bank rows per chunk the per-chunk overhead dominates the matmul
_FIRST_BANK_CHUNK = 1024  # rows of the first bank chunk (at least 2k): its dense top-k fills the running top-k
#: dense query chunks: 256-1024 rows were fastest at 50k x 384, 2k queries, k = 20 and 200, 1 thread (2000: 15% slower)
_DENSE_QUERY_ROWS = 512
#: fewer queries per dense block than this and the bank is re-read too often: 64 matched streaming at k = 20
_MIN_DENSE_QUERIES = 64


def _itemsize(x: Any) -> int:
    return x.element_size() if isinstance(x, torch.Tensor) else np.dtype(x.dtype).itemsize


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
        self.itemsize = _itemsize(x)
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
    """Bytes the streaming path holds at once with query chunk ``q`` and bank chunk ``b`` (besides its result):
    each chunk as read (``itemsize``) and as normalised float32 (bank: plus the float32 copy before normalising),
    the similarity block with its mask, and the running top-k with its merge buffers."""
    per_query = dim * (itemsize + 4) + _MERGE_BYTES_PER_K * k
    per_bank = dim * (itemsize + 8)
    return q * per_query + b * per_bank + _CELL_BYTES * q * b


def _dense_working_bytes(q: int, n_bank: int, dim: int, k: int, itemsize: int, threads: int) -> int:
    """Bytes the dense path holds at once with query chunk ``q`` (besides its result): the whole bank as read and
    normalised (as in :func:`_working_bytes`), the query chunk, its [q, n_bank] float32 similarity block, the top-k's
    output and its per-thread row copies."""
    return n_bank * (dim * (itemsize + 8) + _TOPK_ROW_BYTES * threads) + q * (
        dim * (itemsize + 4) + 4 * n_bank + _RESULT_BYTES_PER_K * k)


def _chunk_sizes(n_query: int, n_bank: int, k: int, max_memory: int, itemsize: int = 4, *,
                 dim: int = 1) -> tuple[int, int]:
    """Streaming query and bank chunk sizes whose working set (:func:`_working_bytes`) fits ``max_memory``.

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


@dataclass(frozen=True)
class TopkPlan:
    """How :func:`knn_topk` covers the similarity matrix: ``path`` (``dense`` or ``stream``), queries and bank rows
    per block (dense: the whole bank), neighbours ``k`` (at most the included bank rows) and the bytes it holds at
    once, its result included."""

    path: str
    query_chunk: int
    bank_chunk: int
    k: int
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "query_chunk": self.query_chunk, "bank_chunk": self.bank_chunk}


def check_inputs(train_features: Any, test_features: Any, k: int, exclude: np.ndarray | None) -> int:
    """Refuse empty or mismatched features and an ``exclude`` mask that is not one per bank row or leaves none;
    the number of neighbours a search returns: ``k``, at most the included bank rows."""
    n_train, n_test = int(train_features.shape[0]), int(test_features.shape[0])
    if n_train == 0 or n_test == 0:
        raise FeatureError(f"Expected non-empty features, but got {n_train} train and {n_test} test samples")
    if train_features.shape[1] != test_features.shape[1]:
        raise FeatureError(
            f"Expected train and test features of the same width, but got {train_features.shape[1]} and "
            f"{test_features.shape[1]}"
        )
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (n_train,) or exclude.all():
            raise FeatureError(f"Expected `exclude` to be a mask of {n_train} bank rows leaving at least one, but got "
                               f"shape {exclude.shape} with {int(exclude.sum())} set")
        k = min(k, n_train - int(exclude.sum()))
    return min(k, n_train)


def knn_plan(train_features: Any, test_features: Any, k: int, *, max_memory: int = DEFAULT_MAX_MEMORY,
             exclude: np.ndarray | None = None, path: str | None = None, backend: str = "torch",
             device: str | torch.device | None = None) -> TopkPlan:
    """The plan :func:`knn_topk` follows for these inputs (it reads only their shapes and dtypes): dense when the
    dense path fits ``max_memory`` with at least ``_MIN_DENSE_QUERIES`` queries per block (or all of them, when
    fewer), else streaming; ``path`` forces one. ``backend="faiss"``: :func:`.knn_faiss.faiss_plan` (on ``device``).
    Raises when the plan does not fit the budget."""
    if backend not in KNN_BACKENDS:
        raise FeatureError(f"Expected `backend` to be one of {list(KNN_BACKENDS)}, but got {backend!r}")
    if backend == "faiss":
        if path is not None:
            raise FeatureError(f"Expected `path` to be None with the faiss backend, but got {path!r}")
        from .knn_faiss import faiss_plan  # faiss itself is imported only there, and only when used

        return faiss_plan(train_features, test_features, k, max_memory=max_memory, exclude=exclude, device=device)
    if path is not None and path not in PATHS:
        raise FeatureError(f"Expected `path` to be 'dense', 'stream' or None, but got {path!r}")
    k = check_inputs(train_features, test_features, k, exclude)
    n_train, n_test = int(train_features.shape[0]), int(test_features.shape[0])
    dim, itemsize = int(train_features.shape[1]), max(_itemsize(train_features), _itemsize(test_features))
    result_bytes = _RESULT_BYTES_PER_K * k * n_test
    threads = torch.get_num_threads()
    fixed = _dense_working_bytes(0, n_train, dim, k, itemsize, threads)
    per_query = _dense_working_bytes(1, n_train, dim, k, itemsize, threads) - fixed
    q_dense = min(n_test, _DENSE_QUERY_ROWS, max(0, (max_memory - result_bytes - fixed) // per_query))
    if path == "dense" or (path is None and q_dense >= min(n_test, _MIN_DENSE_QUERIES)):
        q = max(q_dense, 1)
        need = result_bytes + fixed + q * per_query
        plan = TopkPlan("dense", q, n_train, k, need)
    else:
        q, b = _chunk_sizes(n_test, n_train, k, max_memory - result_bytes, itemsize, dim=dim)
        plan = TopkPlan("stream", q, b, k, result_bytes + _working_bytes(q, b, dim, k, itemsize))
    if plan.bytes > max_memory:
        raise FeatureError(
            f"Expected a k-NN memory budget of at least {plan.bytes} bytes for {n_test} queries (k={k}, D={dim}, "
            f"{plan.path} path), but got {max_memory}; raise --max-memory"
        )
    return plan


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


def _progress(n_test: int, qc: int, n_train: int) -> Any:
    """A progress bar over the similarity blocks, counted in bank rows (each query block scans the whole bank)."""
    return progress.bar(desc=f"k-NN search, {n_test} queries x {n_train} bank rows", total=-(-n_test // qc) * n_train,
                        unit="row", unit_scale=True)


def _dense(bank: _Rows, queries: _Rows, plan: TopkPlan, dev: torch.device, excluded: torch.Tensor | None,
           out_s: torch.Tensor, out_i: torch.Tensor) -> None:
    """Each query chunk against the whole normalised bank: one similarity block, one top-k."""
    n_train, n_test, qc = bank.n, queries.n, plan.query_chunk
    whole = F.normalize(bank.read(0, n_train, dev), dim=1)
    sims_buf = torch.empty(qc * n_train, device=dev)  # reused by every chunk (fresh large allocations page-fault)
    with _progress(n_test, qc, n_train) as bar:
        for qs in range(0, n_test, qc):
            qe = min(qs + qc, n_test)
            q = F.normalize(queries.read(qs, qe, dev), dim=1)
            sims = torch.mm(q, whole.T, out=sims_buf[: (qe - qs) * n_train].view(qe - qs, n_train))
            if excluded is not None:
                sims[:, excluded] = -math.inf
            s, i = sims.topk(plan.k, dim=1)
            out_s[qs:qe] = s.cpu()
            out_i[qs:qe] = i.cpu()
            bar.update(n_train)


def _stream(bank: _Rows, queries: _Rows, plan: TopkPlan, dev: torch.device, excluded: torch.Tensor | None,
            out_s: torch.Tensor, out_i: torch.Tensor) -> None:
    """Bank chunks merged into a running top-k per query chunk (see :func:`_merge`)."""
    n_train, n_test, qc, bc, k = bank.n, queries.n, plan.query_chunk, plan.bank_chunk, plan.k
    # One similarity buffer and one mask buffer, reused by every block (fresh large allocations page-fault).
    sims_buf = torch.empty(qc * bc, device=dev)
    mask_buf = torch.empty(qc * bc, dtype=torch.bool, device=dev)
    with _progress(n_test, qc, n_train) as bar:
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
                bar.update(be - bs)
                bs, step = be, min(bc, be)
            out_s[qs:qe] = best_s.cpu()
            out_i[qs:qe] = best_i.cpu()


def knn_topk(
    train_features: Any, test_features: Any, k: int, *, max_memory: int = DEFAULT_MAX_MEMORY,
    device: str | torch.device | None = None, exclude: np.ndarray | None = None, path: str | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices of the ``k`` nearest train samples of each test sample.

    Args:
        train_features: [N_train, D]; test_features: [N_test, D] (numpy, memmap or torch; any float dtype).
        k: neighbours; more than the bank's (included) rows gives that many.
        max_memory: bytes this call may allocate, its result included (see the module docstring).
        exclude: optional bool mask [N_train]: bank rows that are never neighbours (their similarities are set to
            -inf before the top-k; e.g. a held-out part of the bank queried against the rest).
        path: None picks the dense path when it fits ``max_memory``, else streams (:func:`knn_plan`); "dense" or
            "stream" forces one.
        backend: "torch" (this module) or "faiss" (:mod:`.knn_faiss`: the same result from faiss's exact
            ``IndexFlatIP``, on ``device`` when it is CUDA and faiss has GPU support; ``path`` must be None).
    Returns:
        (sims [N_test, k'] float32 descending, idx [N_test, k'] int64) on CPU, k' = min(k, included bank rows).
    """
    plan = knn_plan(train_features, test_features, k, max_memory=max_memory, exclude=exclude, path=path,
                    backend=backend, device=device)
    if backend == "faiss":
        from .knn_faiss import faiss_topk

        return faiss_topk(train_features, test_features, plan, exclude=exclude, device=device)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    excluded = torch.from_numpy(np.asarray(exclude, dtype=bool)).to(dev) if exclude is not None else None
    log.debug("k-NN plan: %s path, %d queries x %d bank rows per block, ~%.1f MiB of %.1f MiB", plan.path,
              plan.query_chunk, plan.bank_chunk, plan.bytes / 2**20, max_memory / 2**20)
    n_test = int(test_features.shape[0])
    all_sims = torch.empty(n_test, plan.k)
    all_idx = torch.empty(n_test, plan.k, dtype=torch.long)
    bank, queries = _Rows(train_features), _Rows(test_features)
    try:
        (_dense if plan.path == "dense" else _stream)(bank, queries, plan, dev, excluded, all_sims, all_idx)
    finally:
        bank.close()
        queries.close()
    return all_sims, all_idx
