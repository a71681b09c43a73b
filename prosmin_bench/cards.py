"""Task and model cards: TOML files that are data, not code.

Card folders, in the order they are read (a name defined twice anywhere is an error that names both files):

1. user folders: ``--cards DIR`` (``add_card_dir``) and ``$PROSMIN_BENCH_CARDS`` (``os.pathsep``-separated); each
   may hold ``tasks/*.toml`` and ``baselines/*.toml`` subfolders or the TOML files directly (a card says what it is
   by its fields);
2. the checkout: ``tasks/`` and ``baselines/`` beside the ``prosmin_bench`` package, when running from source;
3. package data of an installed wheel: ``prosmin_bench/_cards/{tasks,baselines}``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from .config import CARDS_ENV
from .errors import CardError
from .registry import NAME_RULE, is_safe_name

log = logging.getLogger(__name__)

T = TypeVar("T")

_extra_dirs: list[Path] = []
_on_change: list[Any] = []


def on_change(callback: Any) -> Any:
    """Register a function called when the set of card folders changes (catalogues drop their caches)."""
    _on_change.append(callback)
    return callback


def lazy_catalogue(build: Callable[[], T]) -> Callable[[], T]:
    """Decorator for a catalogue built from cards: ``build()`` runs on the first call, its result is kept, and it
    runs again after the card folders change (``--cards DIR``). Listing models or tasks reads cards, never more;
    one lock, so two threads asking at once build it once."""
    lock = threading.Lock()
    built: list[T] = []

    @on_change
    def _reset() -> None:
        with lock:
            built.clear()

    @functools.wraps(build)
    def get() -> T:
        with lock:
            if not built:
                built.append(build())
            return built[0]

    return get


def add_card_dir(path: str | os.PathLike) -> None:
    """Add a user card folder (``--cards DIR``); raises if it does not exist."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise CardError(f"Card folder {str(p)!r} does not exist; --cards expects a folder of TOML cards")
    if p not in _extra_dirs:
        _extra_dirs.append(p)
    for callback in _on_change:
        callback()


def clear_card_dirs() -> None:
    """Forget ``--cards`` folders added in this process (tests use it)."""
    _extra_dirs.clear()
    for callback in _on_change:
        callback()


def user_card_dirs() -> list[Path]:
    dirs = list(_extra_dirs)
    env = os.environ.get(CARDS_ENV, "")
    for part in env.split(os.pathsep):
        if part.strip():
            p = Path(part.strip()).expanduser()
            if not p.is_dir():
                raise CardError(f"{CARDS_ENV} names {str(p)!r}, which is not a folder; fix or unset it")
            dirs.append(p)
    return dirs


def source_tree_dir(kind: str) -> Path | None:
    """``tasks/`` or ``baselines/`` of the checkout the package runs from, if any."""
    pkg = Path(__file__).resolve().parent
    candidate = pkg.parent / kind
    if candidate.is_dir() and (pkg.parent / "pyproject.toml").is_file():
        return candidate
    return None


def package_data_dir(kind: str) -> Path | None:
    """``prosmin_bench/_cards/<kind>`` inside an installed wheel, if present."""
    try:
        p = Path(str(resources.files("prosmin_bench").joinpath("_cards", kind)))
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    return p if p.is_dir() else None


def builtin_card_dir(kind: str) -> Path | None:
    """Where the shipped cards of ``kind`` ("tasks" or "baselines") are read from: the checkout, else the wheel."""
    return source_tree_dir(kind) or package_data_dir(kind)


@dataclass(frozen=True)
class Card:
    path: Path
    data: dict[str, Any]
    origin: str  # "user", "checkout" or "package"


def read_card(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise CardError(f"Card {str(path)!r} is not valid TOML ({exc}); fix the syntax") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition; a Latin-1 or UTF-16 file lands here
        raise CardError(
            f"Card {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise CardError(f"Card {str(path)!r} cannot be read ({exc.strerror})") from None


def _card_files(folder: Path, kind: str) -> Iterable[Path]:
    sub = folder / kind
    if sub.is_dir():
        yield from sorted(sub.glob("*.toml"))
    yield from sorted(folder.glob("*.toml"))


def iter_cards(kind: str) -> list[Card]:
    """All cards of ``kind``: user folders first, then the shipped ones. ``kind`` is "tasks" or "baselines".

    A user card folder may mix kinds: a task card has ``kind =`` and ``main_score =``; a model card has ``arch =``.
    """
    is_kind = (lambda d: "main_score" in d or "kind" in d) if kind == "tasks" else (lambda d: "arch" in d)
    out: list[Card] = []
    for folder in user_card_dirs():
        for path in _card_files(folder, kind):
            data = read_card(path)
            if is_kind(data):
                out.append(Card(path, data, "user"))
    shipped = builtin_card_dir(kind)
    if shipped is not None:
        origin = "checkout" if shipped == source_tree_dir(kind) else "package"
        for path in sorted(shipped.glob("*.toml")):
            out.append(Card(path, read_card(path), origin))
    return out


_MISSING = object()


def field(card: Card, key: str, typ: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Read ``key`` from a card, checking its type; errors name the file and the field."""
    node: Any = card.data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise CardError(f"Card {str(card.path)!r}: required field {key!r} is missing")
            return default
        node = node[part]
    if typ is float and isinstance(node, int) and not isinstance(node, bool):
        node = float(node)
    if not isinstance(node, typ) or (isinstance(node, bool) and typ in (int, float)):
        want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
        raise CardError(
            f"Card {str(card.path)!r}: field {key!r} must be {want}, but got {type(node).__name__} {node!r}"
        )
    return node


def name_field(card: Card, key: str = "name", default: Any = _MISSING) -> Any:
    """Read a name that becomes a file or folder name (``registry.NAME_PATTERN``): a task or model name, a recipe,
    a weights file name. ``../x``, ``/abs/x`` or ``.hidden`` would write outside the folder meant for it."""
    value = field(card, key, str, default)
    if value is None:  # an optional name the card leaves out
        return None
    if not is_safe_name(value):
        raise CardError(
            f"Card {str(card.path)!r}: field {key!r} must be a plain name ({NAME_RULE}) because it becomes a file "
            f"name, but got {value!r}"
        )
    return value


def check_known_fields(card: Card, allowed: Iterable[str]) -> None:
    """Unknown top-level fields are errors (a typo must not silently fall back to a default)."""
    unknown = sorted(set(card.data) - set(allowed))
    if unknown:
        raise CardError(
            f"Card {str(card.path)!r}: unknown field(s) {unknown}; allowed fields are {sorted(allowed)}"
        )
