"""Everything that touches ``torch.distributed`` (nanoGPT keeps DDP in one place; so does this suite).

Processes are started by ``torchrun`` (or ``python -m torch.distributed.run``), which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; multi-node runs use torchrun's usual
``--nnodes/--node_rank/--rdzv_*`` options. :func:`init_from_env` joins the process group (NCCL when the process
has a CUDA device, gloo otherwise); a single-process torchrun launch joins a group of one, so that it takes the
multi-process path (on a one-GPU machine the only way to run NCCL). Without a launch every helper here is the
single-process identity, so library code calls them unconditionally.

Used by pretraining (gradient synchronisation, centres, checkpoint writes by rank 0) and by distributed
evaluation, whose protocol is here too: rank 0 leads (:func:`lead`) and the other ranks follow (:func:`follow`),
so every extraction is a collective all ranks enter together; a step that fails on one rank fails on all
(:func:`on_every_rank`), so none waits for the others until the process-group timeout; each rank extracts its
:func:`shard_indices` shard and :func:`gather_rows` puts the rows back in sample order.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ProsminBenchError

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(ProsminBenchError):
    """A distributed launch that is misconfigured (missing torchrun variables, unavailable backend)."""


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun started this process (it sets ``TORCHELASTIC_RUN_ID``), even as the only one, or when the
    environment describes several processes (``WORLD_SIZE`` > 1, e.g. set by another launcher).

    A single-process torchrun run joins a process group of one, so that it takes the same path as a multi-GPU run
    (NCCL, DDP, all-reduced centre): on a machine with one GPU that is the only way to exercise NCCL at all.
    """
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str | torch.device | None = None, *, backend: str | None = None,
                  timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment variables (idempotent).

    Args:
        device: the device this process will compute on; ``"cuda"``/``"auto"`` with a GPU pick NCCL and bind
            the process to ``cuda:LOCAL_RANK``, anything else gloo.
        backend: force a backend (``"gloo"`` or ``"nccl"``).
    Returns:
        :class:`DistInfo` (rank 0 of 1 with ``backend=None`` when not launched distributed).
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, None)
    missing = [k for k in _ENV_KEYS if k not in os.environ]
    if missing:
        raise DistributedError(
            f"A distributed launch (torchrun, or WORLD_SIZE > 1) but torchrun variables {missing} are unset; "
            "launch with `torchrun --nproc_per_node=N -m prosmin_bench pretrain ...`"
        )
    if not dist.is_available():
        raise DistributedError("This PyTorch build has no torch.distributed; run with a single process")
    local_rank = int(os.environ["LOCAL_RANK"])
    dev = str(device) if device is not None else "auto"
    use_cuda = torch.cuda.is_available() and (dev == "auto" or dev.startswith("cuda"))
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise DistributedError("The NCCL backend needs CUDA devices; use gloo on CPU")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    # torch._dynamo must be imported before the group exists. Imported afterwards (timm and torchvision import it),
    # it keeps references to the default group (seen with torch 2.14), so destroy_process_group() no longer frees
    # it: the gloo worker threads outlive the group, and one releasing a finished collective's tensors during
    # interpreter shutdown aborts the process ("terminate called without an active exception") after the job's
    # work is done. tests/test_ddp.py checks that leaving the group ends its threads.
    importlib.import_module("torch._dynamo")  # (an `import torch._dynamo` here would make `torch` a local name)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    # Library calls (pretrain, evaluate) leave the group joined for later calls in the same job; it is left at
    # exit, while the interpreter is still whole (atexit runs before shutdown; destroy() is a no-op if already left).
    atexit.unregister(destroy)  # one registration, however often a job joins
    atexit.register(destroy)
    i = info()
    log.info("joined process group: rank %d of %d (local rank %d, %s)", i.rank, i.world_size, i.local_rank, backend)
    return i


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    if not is_initialized():
        return DistInfo(0, 1, 0, None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    str(dist.get_backend()))


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0 (and in single-process runs): the only process that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Leave the process group (end of a torchrun job)."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over processes (a new tensor; ``t`` itself is unchanged)."""
    out = t.detach().clone()
    if is_initialized() and world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over processes (a new tensor)."""
    n = world_size()
    out = all_reduce_sum(t)
    return out / n if n > 1 else out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every process (picklable objects)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object from every process, in rank order."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors [n_rank, ...] from all processes along dim 0, in rank order; n_rank may differ."""
    if not is_initialized() or world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts)
    buf = t.new_zeros((pad, *t.shape[1:]))
    buf[: t.shape[0]] = t
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def shard_indices(n: int, rank: int | None = None, world: int | None = None) -> range:
    """Contiguous shard ``rank`` of ``range(n)`` for ``world`` processes; shards cover every index exactly once
    (sizes differ by at most one), so concatenating them in rank order gives ``range(n)`` back."""
    here = info()
    rank = here.rank if rank is None else rank
    world = here.world_size if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"Expected 0 <= rank < world >= 1, but got rank={rank}, world={world}")
    return range(n * rank // world, n * (rank + 1) // world)


#: Bytes each rank contributes to one :func:`gather_rows` round: the gather buffers stay at world x 64 MiB whatever
#: the dataset size (a 1.28M x 1536 float16 bank is 3.9 GB; gathering it in one call would need that per rank twice).
GATHER_ROUND_BYTES = 64 << 20


def gather_rows(local: np.ndarray, n: int, allocate: Callable[[tuple[int, ...], Any], np.ndarray] = np.empty,
                device: torch.device | str = "cpu") -> np.ndarray:
    """Every rank's :func:`shard_indices` ``(n)`` rows [n_rank, ...] -> all ``n`` rows in sample order, on every
    rank, in an array from ``allocate(shape, dtype)`` (e.g. a memmap). ``device``: where this rank computes;
    the rows travel through it on NCCL (which moves CUDA tensors only), through the CPU on gloo.

    Rows travel as raw bytes (exact for any dtype, and every backend can gather uint8), in rounds of at most
    :data:`GATHER_ROUND_BYTES` per rank so the gather buffers stay bounded.
    """
    world = world_size()
    comm = torch.device(device) if info().backend == "nccl" else torch.device("cpu")
    shards = [shard_indices(n, r, world) for r in range(world)]
    # An empty shard does not know the row shape (e.g. a predictive layer); the ranks with data do.
    reports = all_gather_object((tuple(local.shape[1:]), local.dtype.str) if len(local) else None)
    shapes = {rep for rep in reports if rep is not None}
    if len(shapes) != 1:
        raise DistributedError(f"Ranks computed rows of different shapes or dtypes: {sorted(shapes)}")
    (row_shape, dtype_str), = shapes
    dtype = np.dtype(dtype_str)
    row_bytes = max(int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize, 1)
    out = allocate((n, *row_shape), dtype)
    out_bytes = out.reshape(n, -1).view(np.uint8)
    if len(local):
        local_bytes = np.ascontiguousarray(local).reshape(len(local), -1).view(np.uint8)
    else:
        local_bytes = np.empty((0, row_bytes), dtype=np.uint8)
    per_round = max(GATHER_ROUND_BYTES // row_bytes, 1)
    longest = max(len(s) for s in shards)
    for start in range(0, longest, per_round):
        piece = torch.from_numpy(np.ascontiguousarray(local_bytes[start : start + per_round]))
        got = all_gather_varlen(piece.to(comm)).cpu().numpy()
        at = 0
        for s in shards:
            c = max(0, min(per_round, len(s) - start))
            out_bytes[s.start + start : s.start + start + c] = got[at : at + c]
            at += c
    return out


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def on_every_rank(fn: Callable[[], T], *, elsewhere: Callable[[int, str], BaseException],
                  catch: tuple[type[BaseException], ...] = (Exception,),
                  describe: Callable[[BaseException], str] = _first_line) -> T:
    """``fn()`` on every rank; if it raised (one of ``catch``) anywhere, raise everywhere: on a rank where it failed
    its own error, on the others ``elsewhere(rank, message)`` for the first rank that failed, ``message`` being
    ``describe(error)`` there. A rank failing alone would leave the others waiting in the next collective until
    the process-group timeout. Every rank must call this (a collective); in one process it is ``fn()``."""
    try:
        result, err = fn(), None
    except catch as exc:
        result, err = None, exc
    reports = all_gather_object(None if err is None else describe(err))
    if err is not None:
        raise err
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        raise elsewhere(*failed[0])
    return result


def lead(message: Any) -> None:
    """Rank 0 of several: tell the other ranks, waiting in :func:`follow`, what to do next (a picklable message;
    ``None`` ends their loop). Elsewhere, and in one process, nothing."""
    if world_size() > 1 and is_main():
        broadcast_object(message)


def follow(handle: Callable[[Any], None]) -> None:
    """Ranks other than 0: ``handle(message)`` for each message rank 0 sends with :func:`lead`, in order, until it
    sends ``None``. Both sides then enter the same collectives in the same order."""
    while True:
        message = broadcast_object(None)
        if message is None:
            return
        handle(message)


def wrap_ddp(module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module``. Buffers are not broadcast (the
    pretraining methods all-reduce their statistics themselves); on GPUs BatchNorm layers become SyncBatchNorm."""
    if not is_initialized() or world_size() == 1:
        return module
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        if device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        else:  # SyncBatchNorm is GPU-only in PyTorch
            log.warning("BatchNorm layers use per-process batch statistics on %s (SyncBatchNorm needs CUDA)", device)
    ids = [device.index] if device.type == "cuda" else None
    # No buffer broadcast before each forward. PyTorch >= 2.14 spells that `forward_sync_buffers=False` and warns
    # (FutureWarning) on `broadcast_buffers=False`; the new spelling also syncs buffers once at construction, which
    # changes nothing here: every rank builds the same model from the same seed (or loads the same checkpoint).
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=find_unused_parameters, **no_sync
    )


def distributed_sampler(dataset: Sequence[Any] | torch.utils.data.Dataset, *, seed: int, shuffle: bool = True,
                        drop_last: bool = True) -> torch.utils.data.distributed.DistributedSampler:
    """A ``DistributedSampler`` over this process's share (call ``set_epoch`` every epoch)."""
    return torch.utils.data.distributed.DistributedSampler(
        dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed, drop_last=drop_last
    )
