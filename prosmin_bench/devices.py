"""The one place a device name (``--device``, ``device=``) becomes a ``torch.device``, for evaluation and
pretraining alike: checked against this machine, and under ``torchrun`` bound to this process's GPU."""

from __future__ import annotations

import torch

from . import distributed
from .errors import ProsminBenchError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else MPS (Apple GPU), else CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps``
    are checked against this machine (a ProsminBenchError saying what exists instead of a failure deep inside the
    run). A ``torch.device`` is taken as it is.

    In a process group of several ranks (torchrun) each process computes on its own GPU: ``"auto"`` and ``"cuda"``
    mean ``cuda:LOCAL_RANK``, and ``"auto"`` without CUDA means the CPU (the ranks exchange CPU tensors over gloo).
    """
    if isinstance(device, torch.device):
        return device
    several = distributed.world_size() > 1
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        else:
            return torch.device("mps" if _mps_available() and not several else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ProsminBenchError(f"Expected --device auto, cpu, cuda, cuda:N or mps, but got {device!r}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ProsminBenchError(f"--device {device} was asked for, but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ProsminBenchError(
                f"--device {device} was asked for, but this machine has {count} CUDA device{'s' * (count > 1)} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use one of those or --device cpu"
            )
        if dev.index is None and several:
            return torch.device("cuda", distributed.local_rank() % count)
    if dev.type == "mps" and not _mps_available():
        raise ProsminBenchError(f"--device {device} was asked for, but MPS (Apple GPU) is not available here; "
                                "use --device cpu")
    return dev
