"""The suite's exception types.

Every error a user can cause derives from :class:`ProsminBenchError`; the CLI prints its message as one line on
stderr and exits non-zero (with a traceback only under ``--debug``). Messages say what was wrong and what to do.
"""

from __future__ import annotations

import re


class ProsminBenchError(Exception):
    """Base class for user-facing errors: the message is the whole story."""

    exit_code = 2


class UnknownNameError(ProsminBenchError, KeyError):
    """A model, task, dataset or recipe name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(ProsminBenchError):
    """Two registrations under one name."""


class CardError(ProsminBenchError):
    """A malformed task or model card (TOML)."""


class DataError(ProsminBenchError):
    """A dataset that is missing, empty, in the wrong layout or unreadable."""


class WeightsError(ProsminBenchError):
    """A weights file that is missing, truncated, in an unknown format, mismatched or with a wrong checksum."""


class FeatureError(ProsminBenchError):
    """Features that cannot be used (NaN or inf, wrong shape)."""


class ResultsError(ProsminBenchError):
    """A results folder that cannot be written."""


class CacheError(ProsminBenchError):
    """A cache folder (``PROSMIN_BENCH_HOME``) that cannot be written."""


class PretrainError(ProsminBenchError):
    """Pretraining failed in a way the user must act on (e.g. a non-finite loss)."""


class ConfigError(ProsminBenchError):
    """A pretraining config or override that does not fit the typed config."""


#: The first line torch's DataLoader gives an error re-raised from a worker process (``ExceptionWrapper``).
_WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def one_line(exc: BaseException) -> str:
    """The one-line message of an error, for logs, error records and the CLI.

    An error raised in a DataLoader worker (an unreadable image with ``--num-workers`` > 0) is re-raised by torch
    as ``Caught DataError in DataLoader worker process 0.`` followed by the worker's traceback; the original
    message is the traceback's last ``<type>: <message>`` line, recovered here.
    """
    lines = str(exc).splitlines()
    if not lines:
        return type(exc).__name__
    if _WORKER_ERROR.match(lines[0]):
        cls = type(exc)
        heads = (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: ")
        for line in reversed(lines):
            for head in heads:
                if line.startswith(head):
                    return line[len(head):]
    return lines[0]
