"""The faiss backend of the exact cosine top-k (``prosmin-bench run --knn-backend faiss``; ``knn_topk(...,
backend="faiss")``).

Same inputs and result as :func:`.knn_search.knn_topk` (similarities [N_test, k'] float32 descending and bank indices
[N_test, k'] int64 on CPU), so ``knn_vote``'s DINO vote is shared: the bank and the queries are L2-normalised the
same way (``F.normalize``) and searched with faiss's exact inner-product index, ``IndexFlatIP`` (a
``GpuIndexFlatIP`` when the run's device is CUDA and faiss has GPU support, else on the CPU). The neighbours are
those of the torch backend up to float rounding and the order of exact ties.

Memory: ``max_memory`` bounds what a search holds at once, its result included, as in :mod:`.knn_search`. The bank
is indexed ``bank_chunk`` rows at a time (faiss's flat index keeps its own float32 copy of them) and each query
block of ``query_chunk`` rows is searched against it; with several bank chunks, each block's top-k is merged into
the running top-k. faiss's own working memory is counted from its source (v1.15.0): the CPU search's
[4096 x 1024] float32 BLAS block (``faiss/utils/distances.cpp`` L381, used once queries x D reaches
``distance_compute_blas_threshold``, L567; below it a per-query loop with no block), its result reservoirs of 2k
per query (``faiss/impl/ResultHandler.h`` L479) and its per-thread heaps when it splits the bank over threads
(``distances.cpp`` L610-L680); the GPU search's double-buffered distance tiles (at most 1 GiB,
``faiss/gpu/impl/DistanceUtils.cuh`` L389-L431), which is also the temporary memory it is given.

faiss is optional: it is imported here only, when this backend runs, and a missing faiss is a one-line
:class:`ProsminBenchError` that says what to install.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FeatureError, ProsminBenchError, one_line
from .knn_search import _MIN_DENSE_QUERIES, TopkPlan, _itemsize, _Rows, check_inputs

log = logging.getLogger(__name__)

PATHS = ("faiss_cpu", "faiss_gpu")  # TopkPlan.path of a faiss plan (the record's extras["search"]["path"])
INSTALL = "pip install 'prosmin-bench[faiss]'"

_QUERY_ROWS = 4096  # queries per search call: faiss's own BLAS query block (distance_compute_blas_query_bs)
#: per query and neighbour: faiss's result (12 B: float32 + int64) and reservoir (24 B, capacity 2k), and the merge
#: into the running top-k: its cat (24 B), top-k (12 B) and gather (8 B)
_MERGE_BYTES_PER_K = 80
_TOPK_ROW_BYTES = 16  # per merged row element and thread: torch's CPU top-k copies a row (see knn_search)
_MIN_BANK_CHUNK = 1024  # bank rows per index at least, where they fit: faiss's own bank block (database_bs)
_DB_PARALLEL_MIN_ROWS = 10_000  # faiss splits the bank over threads from this many rows (distances.cpp L607)
_GPU_TILES = 1 << 30  # faiss GPU: at most this many bytes of distance tiles (chooseTileSize's largest target)
_GPU_MAX_K = 2048  # faiss GPU: largest k its k-selection supports (faiss/gpu/utils/DeviceDefs.cuh L65)


def import_faiss() -> Any:
    """The faiss module; a one-line ProsminBenchError saying what to install where it cannot be imported."""
    try:
        import faiss
    except ModuleNotFoundError:
        raise ProsminBenchError(f"--knn-backend faiss needs faiss, which is not installed here; {INSTALL}") from None
    except ImportError as exc:  # installed but broken (a wheel built against another numpy, a missing library)
        raise ProsminBenchError(f"--knn-backend faiss: faiss cannot be imported ({one_line(exc)}); reinstall it: "
                                f"{INSTALL}") from None
    return faiss


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.info(message)


def gpu_device(faiss: Any, device: str | torch.device | None, k: int) -> int | None:
    """The CUDA device index the search runs on: that of ``device`` when it is CUDA and faiss has GPU support (and
    ``k`` is within its GPU k-selection), else None (the CPU index)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cuda":
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        _say_once("faiss has no GPU support here (faiss-cpu): the k-NN search runs on the CPU")
        return None
    if k > _GPU_MAX_K:
        _say_once(f"k = {k} is above faiss's GPU limit of {_GPU_MAX_K}: the k-NN search runs on the CPU")
        return None
    return dev.index if dev.index is not None else torch.cuda.current_device()


def _search_bytes(faiss: Any, q: int, b: int, *, n_bank: int, n_test: int, dim: int, k: int, itemsize: int,
                  threads: int, gpu: bool) -> int:
    """Bytes a faiss search holds at once with ``q`` queries and ``b`` bank rows per block, its result included:
    the result [n_test, k]; a bank chunk as read, as float32, normalised, and faiss's copy (or its rows kept after an
    exclusion); a query block as read and normalised; per query and neighbour the search's results and the merge;
    and faiss's working memory (the module docstring)."""
    total = n_test * k * 12 + b * dim * (itemsize + 12) + q * dim * (itemsize + 8) + q * k * _MERGE_BYTES_PER_K
    total += threads * 2 * k * _TOPK_ROW_BYTES * (b < n_bank)  # the merge's top-k, with more than one bank chunk
    if gpu:
        rows = min(q, 1024 if dim <= 32 else 512)  # chooseTileSize: the query rows of a tile
        cols = min(b, _GPU_TILES // (8 * rows))  # two tiles of rows x cols float32
        return total + 8 * rows * cols + 2 * rows * -(-b // cols) * k * 12  # + the k-selection of each tile
    bs_x, bs_y = int(faiss.cvar.distance_compute_blas_query_bs), int(faiss.cvar.distance_compute_blas_database_bs)
    if q * dim >= int(faiss.cvar.distance_compute_blas_threshold):
        total += bs_x * bs_y * 4  # the BLAS block, allocated whole whatever the query count
    else:
        total += threads * (2 * k + 16) * 12  # the per-query loop: one reservoir per thread
    if b >= _DB_PARALLEL_MIN_ROWS:  # fewer queries than threads: the bank split over threads, a heap set each
        total += threads * min(q, threads) * (k * 12 + min(bs_y, b) * 4)
    return total


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with ``fits(n)`` (true up to some n, false above it), or 0 when 1 does not fit."""
    if not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def faiss_plan(train_features: Any, test_features: Any, k: int, *, max_memory: int,
               exclude: np.ndarray | None = None, device: str | torch.device | None = None) -> TopkPlan:
    """The blocks of a faiss search within ``max_memory``: the whole bank in one index with up to 4096 queries per
    search when a fast query block (below) fits beside it; else bank chunks of at least 1024 rows (faiss's bank
    block) beside fast query blocks, sized for the fewest search calls; else the largest bank chunk beside 64
    queries (or all), or beside one, and as many queries as then fit. A fast block has enough values for faiss's
    BLAS search (``distance_compute_blas_threshold`` / D rows, at least 64; 4-8x faster than its per-query loop at
    50k x 384 on one thread) or, on a GPU, fills a 512-row tile; or holds all the queries. Raises FeatureError
    when not even one row of each fits."""
    k = check_inputs(train_features, test_features, k, exclude)
    faiss = import_faiss()
    gpu = gpu_device(faiss, device, k) is not None
    n_bank, n_test, dim = int(train_features.shape[0]), int(test_features.shape[0]), int(train_features.shape[1])
    shape = dict(n_bank=n_bank, n_test=n_test, dim=dim, k=k, gpu=gpu, threads=torch.get_num_threads(),
                 itemsize=max(_itemsize(train_features), _itemsize(test_features)))

    def cost(q: int, b: int) -> int:
        return _search_bytes(faiss, q, b, **shape)

    q_max = min(n_test, _QUERY_ROWS)
    fast = 512 if gpu else max(_MIN_DENSE_QUERIES, -(-int(faiss.cvar.distance_compute_blas_threshold) // dim))
    b, q = n_bank, _largest(lambda n: cost(n, n_bank) <= max_memory, q_max)
    if q < min(fast, q_max):  # the bank in chunks, each indexed once and searched by every query block
        fits = []  # (search calls, -bank rows, queries, bank rows) of each fast query block size that fits
        for q in sorted({min(fast << i, q_max) for i in range(13)}):
            b = _largest(lambda n: cost(q, n) <= max_memory, n_bank)
            if b >= min(_MIN_BANK_CHUNK, n_bank):
                fits.append((-(-n_test // q) * -(-n_bank // b), -b, q, b))
        if fits:  # the fewest search calls (each has a fixed cost), then the fewest bank chunks
            q, b = min(fits)[2:]
        else:
            for q in (min(_MIN_DENSE_QUERIES, q_max), 1):
                b = _largest(lambda n: cost(q, n) <= max_memory, n_bank)
                if b:
                    break
            b = max(b, 1)
            q = max(_largest(lambda n: cost(n, b) <= max_memory, q_max), 1)
    plan = TopkPlan(PATHS[gpu], q, b, k, cost(q, b))
    if plan.bytes > max_memory:
        raise FeatureError(f"Expected a k-NN memory budget of at least {plan.bytes} bytes for {n_test} queries "
                           f"(k={k}, D={dim}, {plan.path}), but got {max_memory}; raise --max-memory")
    return plan


def _new_index(faiss: Any, dim: int, gpu: int | None, resources: Any) -> Any:
    if gpu is None:
        return faiss.IndexFlatIP(dim)
    config = faiss.GpuIndexFlatConfig()
    config.device = gpu
    return faiss.GpuIndexFlatIP(resources, dim, config)


def _gpu_resources(faiss: Any, plan: TopkPlan, dim: int) -> Any:
    """faiss GPU resources whose temporary memory is the plan's tile allowance (default: up to 1.5 GiB) and which
    keep no pinned host buffer (default 256 MiB), so the search stays within the budget it was planned for."""
    resources = faiss.StandardGpuResources()
    rows = min(plan.query_chunk, 1024 if dim <= 32 else 512)
    cols = min(plan.bank_chunk, _GPU_TILES // (8 * rows))
    resources.setTempMemory(8 * rows * cols + 2 * rows * -(-plan.bank_chunk // cols) * plan.k * 12)
    resources.setPinnedMemory(0)
    return resources


def faiss_topk(train_features: Any, test_features: Any, plan: TopkPlan, *, exclude: np.ndarray | None = None,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.knn_search.knn_topk` with faiss, following ``plan`` (:func:`faiss_plan`): (sims [N_test, k']
    float32 descending, idx [N_test, k'] int64) on CPU; excluded bank rows are left out of the index."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    faiss = import_faiss()
    gpu = gpu_device(faiss, device, plan.k) if plan.path == "faiss_gpu" else None
    n_bank, n_test, k = int(train_features.shape[0]), int(test_features.shape[0]), plan.k
    keep_all = None if exclude is None else ~np.asarray(exclude, dtype=bool)
    log.debug("k-NN plan: %s, %d queries x %d bank rows per block, ~%.1f MiB", plan.path, plan.query_chunk,
              plan.bank_chunk, plan.bytes / 2**20)
    out_s = torch.full((n_test, k), -math.inf)
    out_i = torch.full((n_test, k), -1, dtype=torch.long)
    bank, queries = _Rows(train_features), _Rows(test_features)
    resources = _gpu_resources(faiss, plan, bank.dim) if gpu is not None else None
    cpu = torch.device("cpu")
    try:
        # faiss-cpu ships its own OpenMP and OpenBLAS, which would otherwise use every core whatever --threads
        # and --jobs gave this process; its omp_set_num_threads may reach torch's OpenMP instead, so threadpoolctl
        # sets (and then restores) each library's count
        with threadpool_limits(limits=torch.get_num_threads()):
            for bs in range(0, n_bank, plan.bank_chunk):
                be = min(bs + plan.bank_chunk, n_bank)
                x = F.normalize(bank.read(bs, be, cpu), dim=1)
                ids = None  # bank index of each indexed row, where rows were excluded
                if keep_all is not None and not keep_all[bs:be].all():
                    if not keep_all[bs:be].any():
                        continue
                    ids = torch.from_numpy(np.flatnonzero(keep_all[bs:be]) + bs)
                    x = x[torch.from_numpy(keep_all[bs:be])]
                index = _new_index(faiss, bank.dim, gpu, resources)
                index.add(np.ascontiguousarray(x.numpy(), dtype=np.float32))
                kk = min(k, x.shape[0])
                del x
                for qs in range(0, n_test, plan.query_chunk):
                    qe = min(qs + plan.query_chunk, n_test)
                    xq = F.normalize(queries.read(qs, qe, cpu), dim=1).numpy()
                    s, i = (torch.from_numpy(a) for a in index.search(np.ascontiguousarray(xq), kk))
                    i = ids[i] if ids is not None else i + bs
                    if plan.bank_chunk >= n_bank:  # one index: its top-k is the result
                        out_s[qs:qe], out_i[qs:qe] = s, i
                        continue
                    top, pos = torch.cat([out_s[qs:qe], s], 1).topk(k, dim=1)
                    out_i[qs:qe] = torch.cat([out_i[qs:qe], i], 1).gather(1, pos)
                    out_s[qs:qe] = top
                del index
    finally:
        bank.close()
        queries.close()
    return out_s, out_i
