"""Ctrl-C and SIGTERM during pretraining: noted, then acted on at the next step boundary after a checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class DeferredStop:
    """SIGINT (Ctrl-C) and SIGTERM (what SLURM and Kubernetes send before a kill) during the loop end the run at
    the next step boundary, after a checkpoint of that step, so a pre-empted run loses nothing and resumes exactly.

    Raising at once could stop inside the optimiser or EMA update and save half a step. The first signal is
    noted and the previous handlers are put back, so a second signal stops at once; :meth:`reraise` then hands
    the signal to the handler that was in place (the CLI's raises KeyboardInterrupt or its ``Terminated``; the
    default SIGTERM action ends the process). Signals that were ignored stay ignored; only the main thread can
    install handlers, so elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> "DeferredStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.getsignal(sig)
                if previous not in (signal.SIG_IGN, None):
                    self._previous[sig] = previous
                    signal.signal(sig, self._note)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum
        self.uninstall()
        log.info("%s: pretraining stops after this step and saves a checkpoint (send it again to stop at once)",
                 signal.Signals(signum).name)

    def reraise(self, checkpoint: Path, step: int) -> None:
        """Deliver the noted signal now that the checkpoint of ``step`` is written; the exception carries
        ``checkpoint = (path, step)`` for the message."""
        signum, self.signum = self.signum, None
        self.uninstall()
        try:
            if signum is None:  # another process of the job was signalled: stop together
                raise KeyboardInterrupt
            handler = signal.getsignal(signum)
            if callable(handler):
                handler(signum, None)
            else:
                signal.raise_signal(signum)
        except KeyboardInterrupt as exc:
            exc.checkpoint = (str(checkpoint), step)  # type: ignore[attr-defined]
            raise
