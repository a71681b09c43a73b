"""The suite's exception types.

Every error a user can cause derives from :class:`ProsminBenchError`; the CLI prints its message as one line on
stderr and exits non-zero (with a traceback only under ``--debug``). Messages say what was wrong and what to do.
"""

from __future__ import annotations


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
