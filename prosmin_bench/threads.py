"""CPU thread policy: how many threads torch uses per process, and how idle OpenMP threads wait.

Two decisions, both overridable:

1. **Idle OpenMP threads sleep** (:func:`prepare_environment`, before torch is imported). Between two parallel
   regions torch's OpenMP threads wait for the next one. GNU libgomp (what torch's Linux wheels ship:
   ``torch/lib/libgomp.so.1``) busy-waits 300,000 spins first when ``OMP_WAIT_POLICY`` is unset, 0 when it is
   ``PASSIVE`` (GCC manual, ``libgomp/doc/openmp-environment-variables/gompspincount.rst``); LLVM/Intel OpenMP
   (macOS and conda builds) takes ``PASSIVE`` as a block time of 0 (llvm-project
   ``openmp/runtime/test/env/omp_wait_policy.c``). On cores that another process keeps busy, the spinning
   threads take the time slices the working ones need (issue 20: a micro pretraining step went from 0.6 s to 4 s
   on a loaded machine). ``OMP_WAIT_POLICY=PASSIVE`` is the one variable that both runtimes read;
   ``GOMP_SPINCOUNT`` and ``KMP_BLOCKTIME`` are left alone (see :data:`WAIT_ENV` for the measurements).
2. **Intra-op threads** (:func:`apply`): see :func:`default_threads`.

Every value the user set wins: ``--threads N`` / ``PROSMIN_BENCH_THREADS``, then ``OMP_NUM_THREADS`` (torchrun
sets it to 1 when it starts several processes per node), and any wait-policy variable already in the environment.
torch is imported inside the functions only, so the CLI can call :func:`prepare_environment` before anything loads
OpenMP.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ProsminBenchError

log = logging.getLogger(__name__)

#: Environment variable with the intra-op thread count (the ``--threads`` flag of the CLI sets the same).
THREADS_ENV = "PROSMIN_BENCH_THREADS"

#: Set by :func:`prepare_environment` where the user has not set them. Only ``OMP_WAIT_POLICY``. Measured with
#: ``benchmarks/bench_load.py`` on 2 cores (torch 2.14.1 wheel, libgomp, 2 threads; two runs): beside two busy
#: Python processes a dino_micro step took 1.31-1.35 s with torch's default spinning and 0.79-0.87 s with PASSIVE
#: (2.0-2.3x its idle time instead of 3.6-3.8x); beside a 2-thread torch matmul job 0.66-0.76 s against
#: 0.80-0.82 s (the one case where spinning wins, by up to 20 %); idle 0.35-0.36 s against 0.38-0.39 s (PASSIVE
#: costs about 7 % on an idle machine: each parallel region wakes a sleeping thread). ``GOMP_SPINCOUNT=0`` alone
#: measured the same as PASSIVE (libgomp reads PASSIVE as a spin count of 0), ``KMP_BLOCKTIME=0`` alone the same
#: as torch's default (libgomp ignores it), so neither is set.
WAIT_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

#: Variables reported in :func:`execution_info` (whoever set them).
REPORTED_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                THREADS_ENV)


class ThreadConfigError(ProsminBenchError, ValueError):
    """A thread or job count that is not a positive integer."""


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`apply` put in effect in this process."""

    intra_op_threads: int  # torch.get_num_threads() after applying
    inter_op_threads: int  # torch.get_num_interop_threads() after applying
    jobs: int  # parallel worker processes sharing this machine's usable cores
    usable_cores: int  # os.sched_getaffinity, or os.cpu_count off Linux
    source: str  # where intra_op_threads came from: "argument", THREADS_ENV, "OMP_NUM_THREADS" or "default"
    wait_env: dict[str, str | None] = field(default_factory=dict)  # OMP_WAIT_POLICY etc. in os.environ now

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_applied: ThreadSettings | None = None


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: what taskset, cgroups' cpusets and Slurm give)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set :data:`WAIT_ENV` where ``environ`` lacks them. Call before torch is imported: OpenMP reads its
    variables once, when the library loads; child processes (``--jobs`` workers, DataLoader workers) inherit them."""
    for name, value in WAIT_ENV.items():
        if name not in environ:
            environ[name] = value


def _positive_int(value: Any, name: str) -> int:
    """``value`` (an int, or the text of an environment variable) as a positive int, else ThreadConfigError."""
    n = value
    if isinstance(value, str):
        try:
            n = int(value.strip())
        except ValueError:
            n = None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ThreadConfigError(f"Expected `{name}` to be a positive integer, but got {value!r}")
    return n


def default_threads(jobs: int = 1, cores: int | None = None) -> int:
    """Intra-op threads per process when nobody chose: the usable cores shared evenly by ``jobs`` processes,
    at least 1.

    Why not fewer: with the passive wait policy (``benchmarks/bench_load.py``, 2 cores, dino_micro step, two runs)
    2 threads took 0.39 s idle against 0.58-0.71 s for 1 thread, and 0.79-0.87 s beside either load that keeps
    both cores busy against 0.92-1.03 s; only beside one busy process (one core free) was 1 thread as fast (0.60 s
    against 0.65 s). Why not more: threads beyond a process's share of the cores only queue behind each other and
    the other jobs' threads.
    """
    jobs = _positive_int(jobs, "jobs")
    return max(1, (usable_cores() if cores is None else cores) // jobs)


def resolve_threads(threads: int | None, jobs: int = 1,
                    environ: Mapping[str, str] = os.environ) -> tuple[int, str]:
    """``(intra-op threads, source)``: ``threads``, else ``PROSMIN_BENCH_THREADS``, else ``OMP_NUM_THREADS``
    (a plain integer: the user's or torchrun's choice), else :func:`default_threads`."""
    jobs = _positive_int(jobs, "jobs")
    if threads is not None:
        return _positive_int(threads, "threads"), "argument"
    if environ.get(THREADS_ENV, "").strip():
        return _positive_int(environ[THREADS_ENV], THREADS_ENV), THREADS_ENV
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:  # a list ("4,2", nested levels) is OpenMP's business, not ours
        return int(omp), "OMP_NUM_THREADS"
    return default_threads(jobs), "default"


def apply(threads: int | None = None, jobs: int = 1) -> ThreadSettings:
    """Set torch's intra-op threads (:func:`resolve_threads`) and inter-op threads (as many, so that ``jobs``
    processes do not oversubscribe the cores), and return what is now in effect."""
    global _applied
    n, source = resolve_threads(threads, jobs)
    import torch

    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # only possible before the first inter-op task; the pool then keeps its size
            log.debug("inter-op threads stay at %d (the pool has started)", torch.get_num_interop_threads())
    cores = usable_cores()
    if n > cores:
        log.warning("%d intra-op threads on %d usable cores: the threads will queue behind each other", n, cores)
    _applied = ThreadSettings(
        intra_op_threads=torch.get_num_threads(), inter_op_threads=torch.get_num_interop_threads(),
        jobs=_positive_int(jobs, "jobs"), usable_cores=cores, source=source,
        wait_env={k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")},
    )
    log.debug("threads: %s", _applied)
    return _applied


def openmp_runtime() -> str | None:
    """The OpenMP library loaded in this process (``libgomp``, ``libiomp5``, ``libomp``), read from
    ``/proc/self/maps``; None where that file does not exist or none is loaded."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    for lib in ("libiomp5", "libomp", "libgomp"):  # wheels may rename a bundled copy, e.g. libgomp-a34b3233.so.1
        if f"/{lib}." in maps or f"/{lib}-" in maps:
            return lib
    return None


def execution_info() -> dict[str, Any]:
    """JSON-safe record of the thread set-up in effect now, for result records."""
    import torch

    return {
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "usable_cores": usable_cores(),
        "jobs": _applied.jobs if _applied is not None else None,
        "threads_source": _applied.source if _applied is not None else None,
        "openmp_runtime": openmp_runtime(),
        "env": {k: os.environ.get(k) for k in REPORTED_ENV},
    }
