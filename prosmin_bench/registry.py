"""One generic registry for models, architectures, tasks, task kinds, datasets and recipes.

Modelled on timm's ``register_model`` and lm-evaluation-harness's registry: things register themselves where they
are defined with a decorator; a duplicate name is an error; an unknown name is an error that lists the closest
names and the command that lists them all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import DuplicateNameError, UnknownNameError

T = TypeVar("T")

#: What a user-given name (task, model, recipe, weights file) may look like. Names become file and folder names
#: under the results folder and the cache, so no separators, no leading dot (no ``..``, no hidden files).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
#: What such a name must match, in words (for error messages).
NAME_RULE = "letters, digits and _ . + - only, starting with a letter or digit"
#: Model names of the form ``timm:<name>[.<tag>]`` are stored in the folder ``timm--<name>[.<tag>]`` (and
#: ``timm:hf-hub:<org>/<repo>`` in ``timm--hf-hub--<org>--<repo>``); registered names may not start with that
#: prefix, so the mapping stays one to one.
TIMM_PREFIX, TIMM_FOLDER_PREFIX = "timm:", "timm--"


def is_safe_name(name: object) -> bool:
    """Whether ``name`` is usable as one file or folder name (``NAME_PATTERN``)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def model_folder_name(model: str) -> str | None:
    """The folder name of a model's records: the name itself, or ``timm--<name>`` for ``timm:<name>``; None when
    ``model`` cannot be a folder name (see ``NAME_PATTERN``)."""
    if isinstance(model, str) and model.startswith(TIMM_PREFIX):
        rest = model[len(TIMM_PREFIX):]
        if rest.startswith("hf-hub:") and rest.count("/") == 1 and "--" not in rest:  # Hugging Face repo names
            rest = rest.replace(":", "--", 1).replace("/", "--")  # never hold "--": timm--hf-hub--<org>--<name>
        return TIMM_FOLDER_PREFIX + rest if is_safe_name(rest) else None
    if not is_safe_name(model) or model.startswith(TIMM_FOLDER_PREFIX):
        return None
    return model


class Registry(Generic[T]):
    """A name -> object mapping with helpful errors.

    Args:
        kind: what the registry holds, used in messages ("model", "task", ...).
        list_hint: the command a user runs to see every name (e.g. "prosmin-bench list models").
    """

    def __init__(self, kind: str, list_hint: str | None = None) -> None:
        self.kind = kind
        self.list_hint = list_hint
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def add(self, name: str, item: T, *, origin: str = "", replace: bool = False) -> T:
        """Register ``item`` under ``name``; a second registration of the same name raises unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise DuplicateNameError(f"Expected a non-empty string as {self.kind} name, but got {name!r}")
        if name in self._items and not replace:
            where = self._origins.get(name) or "elsewhere"
            here = f" (again in {origin})" if origin else ""
            raise DuplicateNameError(
                f"{self.kind} {name!r} is already registered (first in {where}){here}; pick another name"
            )
        self._items[name] = item
        self._origins[name] = origin
        return item

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` (defaults to the object's ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            self.add(key, obj, origin=f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', key)}")
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=3, cutoff=0.5)
        msg = f"Unknown {self.kind} {name!r}"
        if close:
            msg += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        elif not self._items:
            msg += f"; no {self.kind}s are registered"
        if self.list_hint:
            msg += f" (run `{self.list_hint}` to see them all)"
        return msg

    def origin(self, name: str) -> str:
        return self._origins.get(name, "")

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def remove(self, name: str) -> None:
        self._items.pop(name, None)
        self._origins.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} items)"
