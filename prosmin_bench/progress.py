"""Progress of long work, one policy for the whole package: ``tqdm.auto`` bars, or log lines where no one watches.

Long work reports through :func:`bar`: feature extraction (batches), the linear probe's lr sweep (heads), the
low-shot logistic regressions (fits), k-NN search (query blocks), fine-tuning and augmented-probe training (epochs),
pretraining (steps), building ImageNet-C (images); the runner numbers the (model, task) pairs (:func:`pair_label`).
Bars count blocks, epochs, fits or batches, never samples, so their cost is not measurable.

How a bar shows (:func:`style`, a pure function of the situation):

- ``"bar"``: a live bar on a terminal, a widget in Jupyter (``tqdm.auto`` picks it), or anywhere with
  ``--progress on``;
- ``"lines"``: where stderr is not a terminal (SLURM logs, pipes, CI), one INFO log line every
  :data:`LOG_INTERVAL_S` seconds for work that lasts that long, and its final state, instead of a carriage return per
  update; also in ``--jobs`` worker processes, whose live bars would draw over each other on one terminal (their
  parent logs each pair as it comes back);
- ``"off"``: ``-q``, ``evaluate(quiet=True)`` or ``--progress off``; and on every torchrun rank but 0.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

from .errors import ProsminBenchError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")

#: Seconds between two log lines of one piece of work when stderr is not a terminal; work shorter than this logs no
#: progress at all (its own INFO lines say when it starts and ends). 30 s: a line or two a minute in a job's log.
LOG_INTERVAL_S = 30.0

#: A log line carries the bar's numbers without the bar itself.
_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"

_state: dict[str, Any] = {"mode": "auto", "worker": False, "scope": ""}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ProsminBenchError(f"Expected a progress mode in {list(MODES)}, but got {mode!r}")
    return mode


def resolve(option: str | None, quiet: bool) -> str:
    """The mode of ``--progress`` when given, else ``"off"`` with ``-q`` and ``"auto"`` without."""
    return check_mode(option) if option is not None else "off" if quiet else "auto"


def configure(mode: str, *, worker: bool | None = None) -> None:
    """Set this process's mode (``auto``, ``on``, ``off``); ``worker=True`` in a ``--jobs`` worker process."""
    _state["mode"] = check_mode(mode)
    if worker is not None:
        _state["worker"] = bool(worker)


def mode() -> str:
    return str(_state["mode"])


def in_worker() -> bool:
    return bool(_state["worker"])


@contextlib.contextmanager
def using(new_mode: str) -> Iterator[None]:
    """``new_mode`` while the block runs, the previous one after it (a CLI call or an ``evaluate`` in a notebook)."""
    before = mode()
    configure(new_mode)
    try:
        yield
    finally:
        configure(before)


def style(mode: str, *, tty: bool, notebook: bool, main: bool, worker: bool) -> str:
    """How a bar shows (module docstring): ``"bar"``, ``"lines"`` or ``"off"``.

    >>> style("auto", tty=True, notebook=False, main=True, worker=False)
    'bar'
    >>> style("auto", tty=False, notebook=False, main=True, worker=False)
    'lines'
    """
    if check_mode(mode) == "off" or not main:
        return "off"
    if worker:
        return "lines"
    return "bar" if mode == "on" or tty or notebook else "lines"


def _notebook() -> bool:
    """Whether ``tqdm.auto`` draws Jupyter widgets in this process."""
    from tqdm import auto

    return auto.notebook_tqdm is not auto.std_tqdm


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or a process of its own. Without torch loaded there is no process group (and
    importing it here would make `list` and `--help` slow)."""
    if "torch.distributed" not in sys.modules:
        return True
    from . import distributed

    return distributed.is_main()


def current_style() -> str:
    """:func:`style` of this process now."""
    return style(mode(), tty=_stderr_is_terminal(), notebook=_notebook(), main=_is_main(), worker=in_worker())


class _LogLines:
    """tqdm's output in the ``lines`` style: each status it draws becomes one INFO log line (tqdm separates them with
    carriage returns; the blank ones it writes to clear a line are dropped)."""

    def write(self, text: str) -> None:
        for part in text.replace("\n", "\r").split("\r"):
            part = part.strip()
            if part:
                log.info("%s", part)

    def flush(self) -> None:
        pass


def bar(iterable: Iterable[Any] | None = None, *, desc: str, total: float | None = None, unit: str = "it",
        enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """A ``tqdm.auto`` bar over ``iterable`` (or updated by hand: ``total``, ``update``) in this process's
    :func:`current_style`; ``enabled=False`` turns it off whatever the style. Use it as tqdm (``with``, iteration,
    ``update``, ``set_postfix``); when off it is a disabled tqdm, which costs nothing."""
    how = "off" if enabled is False else current_style()
    desc = f"{_state['scope']}: {desc}" if _state["scope"] else desc
    if how == "off":
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True)
    if how == "bar":
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, **kwargs)
    kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=_LogLines(), leave=True, position=0, ascii=True,
                mininterval=LOG_INTERVAL_S, maxinterval=max(LOG_INTERVAL_S, 10.0), delay=LOG_INTERVAL_S, miniters=1,
                bar_format=_LINE_FORMAT if total is not None or _has_len(iterable) else _LINE_FORMAT_NO_TOTAL,
                **kwargs)


@contextlib.contextmanager
def scope(label: str) -> Iterator[None]:
    """Bars made while the block runs are titled ``"<label>: <desc>"`` (the runner's ``"model / task"``, so that
    the lines of several ``--jobs`` workers in one log say whose they are)."""
    before = _state["scope"]
    _state["scope"] = label
    try:
        yield
    finally:
        _state["scope"] = before


def _has_len(iterable: Any) -> bool:
    try:
        len(iterable)
    except TypeError:
        return False
    return True


def pair_label(i: int, n: int) -> str:
    """``"pair i/n"`` for the log lines of the i-th (model, task) pair of a run of n; ``""`` in a ``--jobs`` worker,
    which sees only its model's share (its parent numbers the pairs as they come back)."""
    return "" if in_worker() else f"pair {i}/{n}"
