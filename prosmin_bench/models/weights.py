"""Weights resolution and strict loading: find the file, verify sha256, convert keys, load strictly.

Order of search for a card with a URL: ``weights=`` (``--weights PATH``), ``--weights-dir``, the cache
(``<home>/weights``), then a download via ``torch.hub`` when the network allows. A recipe model's weights are the
pretraining output ``<home>/checkpoints/<recipe>/checkpoint.pt``. Nothing falls back silently to other weights.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .. import config
from ..atomic import atomic_path
from ..errors import WeightsError
from ..paths import inside, recipe_checkpoint_path
from .shipped import shipped_checkpoint
from .checkpoints import interrupted_at
from .converters import StateDict, checkpoint_family, convert
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


def check_weights_file(weights: str | os.PathLike) -> Path:
    """The ``--weights`` path, refused unless it is a file: a folder gets told which file inside it to pass."""
    path = Path(weights).expanduser()
    if path.is_dir():
        inner = path / "checkpoint.pt"
        example = f" (e.g. {str(inner)!r})" if inner.is_file() else ""
        raise WeightsError(
            f"Weights path {str(path)!r} is a folder; pass the checkpoint file inside it{example} as --weights, "
            "or the folder as --weights-dir"
        )
    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} does not exist; check the --weights path")
    return path


def _is_default_recipe_path(recipe: str, path: Path) -> bool:
    try:
        return path.resolve() == recipe_checkpoint_path(recipe).resolve()
    except OSError:
        return False


def remake_advice(recipe: str, path: str | os.PathLike, *, automatic: bool) -> str:
    """How to make a damaged pretraining output again (there is nothing to download: the recipe makes it).

    ``automatic``: ``prosmin-bench run`` pretrains a missing checkpoint of this recipe by itself (mini scale).
    """
    path = Path(path)
    if _is_default_recipe_path(recipe, path):
        again = f"make it again with `prosmin-bench pretrain --recipe {recipe}`"
        return f"delete it and {again}" + (" or run again to re-pretrain it automatically" if automatic else "")
    return f"delete it and make it again with `prosmin-bench pretrain --recipe {recipe} --out {path.parent}`"


def interrupted_message(ckpt: Mapping[str, Any], path: str | os.PathLike, *, other_settings: bool = False) -> str:
    """The one-line refusal for an interrupted pretraining checkpoint, with the command that finishes it;
    ``other_settings``: it was started with other settings than its recipe's (said by the caller that knows the
    recipes, ``suite.py``), so the resume needs the ones it was started with."""
    step, end = interrupted_at(ckpt) or (int(ckpt.get("step", 0)), int(ckpt.get("total_steps", 0)))
    recipe, path = str(ckpt.get("recipe")), Path(path)
    command = f"prosmin-bench pretrain --recipe {recipe} --resume"
    if not _is_default_recipe_path(recipe, path):
        command += f" --out {path.parent}"
    same = " with the --epochs and --set values it was started with" if other_settings else ""
    return (
        f"Checkpoint {str(path)!r} is an interrupted pretraining (step {step} of {end}, recipe {recipe}), not a "
        f"finished model; finish it with `{command}`{same}, then run again"
    )


#: Set to 1 to forbid downloads (``HF_HUB_OFFLINE=1``, which the suite's offline runs already set, counts too).
OFFLINE_ENV = "PROSMIN_BENCH_OFFLINE"
#: Seconds to wait for the weights server to answer before calling the network unavailable (a blocked network
#: must fail fast with instructions, not hang).
PROBE_TIMEOUT_S = 15.0


def weights_dir_candidates(spec: ModelSpec, weights_dir: str | os.PathLike | None) -> list[Path]:
    """Where ``--weights-dir`` may hold a recipe model's checkpoint: ``<dir>/<name>/checkpoint.pt``,
    ``<dir>/<name>.pt``, then the same for the model it is a variant of (``prosmin_target_micro`` reads
    ``prosmin_micro``'s checkpoint, so both see the same file)."""
    if weights_dir is None:
        return []
    names = [spec.name] + ([spec.variant_of] if spec.variant_of else [])
    return [p for n in names for p in (Path(weights_dir) / n / "checkpoint.pt", Path(weights_dir) / f"{n}.pt")]


def resolve_weights_path(
    spec: ModelSpec, weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None,
    download: bool = True, shipped: bool = True,
) -> Path | None:
    """Find the weights file for ``spec``; ``None`` for random-init models.

    Order for a card with a URL: ``weights`` (an explicit path), ``weights_dir/<filename>``, the cache
    ``<home>/weights/<filename>``, then a download of the URL into the cache (``torch.hub``, with a progress bar)
    when ``download`` is true and the network allows; a pinned sha256 is checked before the download is kept.
    Raises WeightsError naming the places searched, the URL and where to put the file when nothing is found.
    A recipe model: ``weights_dir`` (:func:`weights_dir_candidates`), ``<home>/checkpoints/<recipe>/``, then, with
    ``shipped``, the checkpoint shipped in the package (``models/shipped.py``).
    """
    if weights is not None:
        return check_weights_file(weights)
    src = spec.weights
    if src.random:
        return None
    if src.recipe:
        looked = weights_dir_candidates(spec, weights_dir)
        looked.append(recipe_checkpoint_path(src.recipe))
        if shipped and shipped_checkpoint(src.recipe) is not None:
            looked.append(shipped_checkpoint(src.recipe))
        for p in looked:
            if p.is_file():
                return p
        raise WeightsError(
            f"No weights for {spec.name!r}: no published checkpoint exists, and none was found at "
            f"{', '.join(map(str, looked))}. Make it with `prosmin-bench pretrain --recipe {src.recipe}` "
            f"(or pass --weights PATH)"
        )
    filename = src.filename or (_url_filename(src.url) if src.url else None)
    if not filename:
        raise WeightsError(f"Model {spec.name!r} names no weights file; pass --weights PATH")
    candidates = []
    if weights_dir is not None:
        candidates.append(Path(weights_dir).expanduser() / filename)
    cached = inside(config.weights_cache_dir(), filename, what="weights file")  # downloads are written here
    candidates.append(cached)
    for p in candidates:
        if p.is_file():
            log.info("weights for %s: %s", spec.name, p)
            return p
    looked_in = ", ".join(map(str, candidates))
    if not src.url:
        raise WeightsError(f"Weights for {spec.name!r} not found (looked in {looked_in}); pass --weights PATH")
    fetch = f"Fetch {src.url} and put it at {candidates[0]}" + (
        "" if weights_dir is not None else " (or in a folder passed as --weights-dir)"
    )
    if not download:
        raise WeightsError(f"Weights for {spec.name!r} not found (looked in {looked_in}). {fetch}")
    offline = _offline_reason()
    if offline:
        raise WeightsError(f"Weights for {spec.name!r} not found (looked in {looked_in}) and {offline}. {fetch}")
    try:
        download_weights(src.url, cached, sha256=src.sha256)
    except WeightsError:
        raise
    except Exception as exc:  # no network, DNS failure, HTTP error, disk full: say what to fetch and where
        raise WeightsError(
            f"Weights for {spec.name!r} not found (looked in {looked_in}) and the download failed "
            f"({_short(exc)}). {fetch}"
        ) from None
    return cached


def _url_filename(url: str) -> str:
    return Path(urlparse(url).path).name


def _offline_reason() -> str | None:
    for var in (OFFLINE_ENV, "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"downloads are disabled ({var}={os.environ[var]})"
    return None


def download_weights(url: str, dest: str | os.PathLike, *, sha256: str | None = None) -> str:
    """Download ``url`` to ``dest`` via ``torch.hub.download_url_to_file`` (progress bar on a terminal).

    The file is written under a temporary name beside ``dest`` and renamed only once complete and, when ``sha256``
    is given, verified, so the cache never holds a partial or wrong file. Returns the file's sha256. The server is probed first with
    a short timeout, so an unreachable network fails fast.
    """
    dest = Path(dest)
    try:  # probe: a HEAD request answered with any HTTP status means the network is there
        req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "prosmin-bench"})
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        pass  # some servers refuse HEAD; the download below reports real HTTP errors
    log.info("downloading %s -> %s", url, dest)
    with atomic_path(dest) as tmp:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        digest = sha256_file(tmp)
        if sha256 and digest != sha256:
            raise WeightsError(
                f"Downloaded {url} has sha256 {digest}, but the card pins {sha256}: the server holds a different "
                "or damaged file; it was not kept. Check the card's URL and sha256"
            )
    log.info("saved %s (sha256 %s)", dest, digest)
    return digest


#: Objects other than tensors and plain containers that official checkpoints pickle, allowed for the safe
#: (``weights_only=True``) unpickler: DINO's and iBOT's full checkpoints store the training ``args`` Namespace.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format since PyTorch 1.6
_PICKLE_PROTO = 0x80  # legacy torch.save files start with a pickle protocol opcode


def load_checkpoint_file(path: str | os.PathLike, *, remake: str = "download it again or pass another file") -> Any:
    """``torch.load`` on CPU with the safe unpickler, with clear errors for empty, truncated and non-checkpoint
    files (an HTML error page saved by a failed download, an image, random bytes).

    Only tensors, plain containers and ``SAFE_GLOBALS`` are unpickled (``weights_only=True``): a checkpoint file
    cannot run code. A file that stores other Python objects is an error that names the object. ``remake`` is
    the advice for a damaged file (a pretraining output is made again, not downloaded: :func:`remake_advice`).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"Weights file {str(path)!r} is empty; {remake}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC and head[:1] != bytes([_PICKLE_PROTO]):
        what = "an HTML/text page (a failed download?)" if head.lstrip()[:1] in (b"<", b"{") else "not a PyTorch file"
        raise WeightsError(
            f"Weights file {str(path)!r} is not a PyTorch checkpoint (it starts with {head!r}: {what}); {remake}"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if m:
            raise WeightsError(
                f"Weights file {str(path)!r} stores a Python object ({m.group(1)}) that is not loaded for safety; "
                "if you trust the file, re-save its state dict with plain tensors and pass that file"
            ) from None
        raise WeightsError(
            f"Weights file {str(path)!r} is truncated or not a PyTorch checkpoint ({_short(exc)}); {remake}"
        ) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, KeyError, BadZipFile... for damaged files
        raise WeightsError(
            f"Weights file {str(path)!r} is truncated or not a PyTorch checkpoint ({_short(exc)}); {remake}"
        ) from None


def _short(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception (torch's messages run on with advice that does not apply here)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    end = first.find(". ")
    return f"{type(exc).__name__}: {(first[: end + 1] if end > 0 else first)[:160]}"


def load_state_strict(module: nn.Module, state: StateDict, *, source: str,
                      advice: str = "Check the model's card (architecture kwargs, converter) or the file") -> None:
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
            f"Checkpoint {source} does not match the architecture: {'; '.join(parts)}. {advice}"
        )
    module.load_state_dict(state, strict=True)


def _fmt_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def load_weights(
    module: nn.Module, spec: ModelSpec, path: str | os.PathLike, *, verify_sha: bool = True, fmt: str | None = None
) -> tuple[str, str, Any]:
    """Load ``path`` into ``module`` strictly: sha256 (checked against the card's pin when ``verify_sha``),
    format detection or the named ``fmt`` / card converter, conversion (of the network ``spec.weights.network``
    names, for this suite's pretraining checkpoints), strict load.

    Returns ``(file_sha256, format_name, checkpoint)``; the sha256 is always computed, so every result records
    exactly which file it came from. A checkpoint that evidently belongs to another method family than the
    card's (e.g. a DINO full checkpoint given to ``mocov3_vits16``, whose 12-head build has the same shapes and
    would load without complaint) is an error, and so is an interrupted pretraining checkpoint (its step-100-of-308
    weights are not the model the name stands for).
    """
    path = Path(path)
    digest = sha256_file(path)
    pinned = spec.weights.sha256
    if verify_sha and pinned and digest != pinned:
        raise WeightsError(
            f"Weights file {str(path)!r} has sha256 {digest}, but the card for {spec.name!r} pins {pinned}: "
            "the file is damaged or a different release; delete it and download it again"
        )
    recipe = spec.weights.recipe
    ckpt = load_checkpoint_file(path) if not recipe else load_checkpoint_file(
        path, remake=remake_advice(recipe, path, automatic=spec.scale == "mini"))
    if interrupted_at(ckpt) is not None:
        raise WeightsError(interrupted_message(ckpt, path))
    try:
        state, name = convert(ckpt, fmt or spec.converter, network=spec.weights.network)
    except WeightsError as exc:  # the converters see a dict, not a file: say which file it was
        raise WeightsError(f"Weights file {str(path)!r}: {exc}") from None
    family = checkpoint_family(ckpt, name)
    if family and spec.method in KNOWN_FAMILIES and family != spec.method:
        raise WeightsError(
            f"Weights file {str(path)!r} is a {family} checkpoint (format {name}), but model {spec.name!r} is "
            f"{spec.method}; pick the model that matches the file (`prosmin-bench list models`)"
        )
    load_state_strict(module, state, source=f"{str(path)!r} (format {name})")
    log.info("loaded %s into %s (format %s, sha256 %s)", path, spec.name, name, digest)
    return digest, name, ckpt


#: Method families whose checkpoints are told apart by ``checkpoint_family``.
KNOWN_FAMILIES = frozenset({"dino", "ibot", "mocov3", "prosmin"})
