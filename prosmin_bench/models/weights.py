"""Weights resolution and strict loading: find the file, verify sha256, convert keys, load strictly.

Order of search for a card with a URL: ``weights=`` (``--weights PATH``), ``--weights-dir``, the cache
(``<home>/weights``), then a download via ``torch.hub`` when the network allows. A recipe model's weights are the
pretraining output ``<home>/checkpoints/<recipe>/checkpoint.pt``. Nothing falls back silently to other weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import config
from ..errors import WeightsError
from .converters import StateDict, convert
from .spec import ModelSpec

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (for weights that exist only in memory, e.g. a random init)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def recipe_checkpoint_path(recipe: str) -> Path:
    """Where ``prosmin-bench pretrain --recipe NAME`` writes its final checkpoint."""
    return config.checkpoints_dir() / recipe / "checkpoint.pt"


def resolve_weights_path(
    spec: ModelSpec, weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Path | None:
    """Find the weights file for ``spec``; ``None`` for random-init models. Raises WeightsError with the places
    searched and what to do when nothing is found."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"Weights file {str(path)!r} does not exist; check the --weights path")
        return path
    src = spec.weights
    if src.random:
        return None
    if src.recipe:
        looked: list[Path] = []
        if weights_dir is not None:
            looked.append(Path(weights_dir) / spec.name / "checkpoint.pt")
            looked.append(Path(weights_dir) / f"{spec.name}.pt")
        looked.append(recipe_checkpoint_path(src.recipe))
        for p in looked:
            if p.is_file():
                return p
        raise WeightsError(
            f"No weights for {spec.name!r}: no published checkpoint exists, and none was found at "
            f"{', '.join(map(str, looked))}. Make it with `prosmin-bench pretrain --recipe {src.recipe}` "
            f"(or pass --weights PATH)"
        )
    filename = src.filename or (Path(src.url).name if src.url else None)
    if filename is None:
        raise WeightsError(f"Model {spec.name!r} names no weights; pass --weights PATH")
    candidates = []
    if weights_dir is not None:
        candidates.append(Path(weights_dir) / filename)
    cached = config.weights_cache_dir() / filename
    candidates.append(cached)
    for p in candidates:
        if p.is_file():
            return p
    if src.url and download:
        try:
            _download(src.url, cached)
            return cached
        except Exception as exc:  # no network, HTTP error: say exactly what to fetch and where to put it
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            raise WeightsError(
                f"Weights for {spec.name!r} not found (looked in {', '.join(map(str, candidates))}) and the "
                f"download failed ({reason}). Fetch {src.url} and put it at {candidates[0]}"
            ) from None
    raise WeightsError(
        f"Weights for {spec.name!r} not found (looked in {', '.join(map(str, candidates))}). "
        f"Fetch {src.url} and put it at {candidates[0]}"
    )


def _download(url: str, dest: Path) -> None:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("PROSMIN_BENCH_OFFLINE") == "1":
        raise ConnectionError("offline mode (HF_HUB_OFFLINE=1 or PROSMIN_BENCH_OFFLINE=1)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    tmp = dest.with_name(dest.name + ".part")
    torch.hub.download_url_to_file(url, str(tmp), progress=True)
    os.replace(tmp, dest)


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with clear errors for truncated files and files that are not checkpoints.

    Tries ``weights_only=True`` first; official full checkpoints pickle an ``argparse.Namespace`` (DINO/iBOT
    ``args``), which needs the full unpickler: that retry is logged.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise WeightsError(f"Weights file {str(path)!r} is empty; download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise WeightsError(f"Weights file {str(path)!r} is not a PyTorch checkpoint ({_short(exc)})") from None
        log.info("%s needs the full unpickler (it stores non-tensor objects); loading it with weights_only=False", path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise WeightsError(
            f"Weights file {str(path)!r} is truncated or not a PyTorch checkpoint ({_short(exc)}); "
            "download it again or pass another file"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(
            f"Weights file {str(path)!r} is truncated or not a PyTorch checkpoint ({_short(exc)})"
        ) from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def load_state_strict(module: nn.Module, state: StateDict, *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a message that lists missing and unexpected keys and shape errors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_fmt_keys(shapes)}")
        raise WeightsError(
            f"Checkpoint {source} does not match the architecture: {'; '.join(parts)}. "
            "Check the model's card (architecture kwargs, converter) or the file"
        )
    module.load_state_dict(state, strict=True)


def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def load_weights(
    module: nn.Module, spec: ModelSpec, path: Path, *, verify_sha: bool = True, fmt: str | None = None
) -> tuple[str, str, Any]:
    """Load ``path`` into ``module`` strictly. Returns ``(file_sha256, format_name, checkpoint)``."""
    digest = sha256_file(path)
    pinned = spec.weights.sha256
    if verify_sha and pinned and digest != pinned:
        raise WeightsError(
            f"Weights file {str(path)!r} has sha256 {digest[:16]}..., but the card for {spec.name!r} pins "
            f"{pinned[:16]}...: the file is corrupt or a different release; download it again"
        )
    ckpt = load_checkpoint_file(path)
    fmt = fmt or spec.converter
    state, name = convert(ckpt, fmt)
    load_state_strict(module, state, source=f"{str(path)!r} (format {name})")
    return digest, name, ckpt
