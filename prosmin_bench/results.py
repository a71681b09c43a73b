"""Typed result records that round-trip to JSON, one file per (model, task), written atomically.

``leaderboards/results/<model>/<task>.json`` is the source of truth; the leaderboard is a pure function of these
files. A failed (model, task) writes an ErrorRecord instead of crashing the suite; a later run retries it.
What a valid record file holds is checked by :mod:`prosmin_bench.record_schema`; where it lives, by
:mod:`prosmin_bench.paths`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import ProsminBenchError, ResultsError
from .paths import record_path
from .record_schema import SCHEMA_VERSION, check_seeds, mean_std, record_problem
from .registry import NAME_RULE, is_safe_name, model_folder_name

#: Run settings that change a record's numbers (``ResultRecord.run_config``), with the values that records written
#: before these were recorded were made with: a record lacking a setting counts as made with its default here.
#: Not among them: the batch size, workers and k-NN memory (they split the same computation differently; the
#: feature cache ignores them too), the data-hash mode (how data identity is checked, not the data) and the device.
#: ``knn_backend`` is among them although both backends find the same neighbours up to float rounding (and the order
#: of exact ties): a record says which search made it, and a record of the other backend is recomputed, not reused.
RUN_CONFIG_DEFAULTS: dict[str, str] = {"precision": "fp32", "feature_dtype": "float32", "knn_backend": "torch"}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("prosmin-bench", "torch", "timm", "scikit-learn", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def git_commit() -> str | None:
    """The checkout's commit when running from a git checkout (with ``+dirty`` if it has changes)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


class _JSONRecord:
    """The JSON round trip both record types share (fields a newer writer added are ignored on read)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ResultRecord(_JSONRecord):
    """The result of one task on one model over one or more seeds (sample std over seeds, ddof = 1).

    ``ci95 = {main_score: [low, high]}``: a 95% percentile-bootstrap interval of the main score (mean over seeds) that
    pools the two sources of spread: each of its 1,000 replicates (``metrics.bootstrap.DEFAULT_N_BOOT``, generator
    seed ``DEFAULT_SEED``) resamples the test images with replacement, one index draw shared by every seed, and the
    seeds with replacement, and averages the per-seed statistic over the drawn seeds (``metrics.pooled_bootstrap_ci``;
    Efron & Tibshirani 1993, ch. 13). ``samples`` stores each seed's per-image values of the main score compactly
    (``record_samples``: bits for correctness), so the leaderboard can run paired tests from the result files alone.
    Both are empty for records made before they existed (no interval is shown) and for tasks without per-sample
    values. ``ranked``: whether the task counts in the leaderboard's mean rank (the card's ``ranked``; None in older
    records). ``model_info["reference"]``: a non-learned reference model (tabulated, never ranked).
    """

    model: str
    task: str
    task_version: int
    task_kind: str
    suite: str
    main_score: str
    weights_sha256: str
    seeds: list[int]
    per_seed: dict[str, dict[str, float]]  # str(seed) -> metric -> value
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    run_config: dict[str, Any] = field(default_factory=dict)  # RUN_CONFIG_DEFAULTS keys: precision, ..., knn_backend
    datasets: dict[str, Any] = field(default_factory=dict)
    # The identity of every dataset the task read: {"hash": "stat" | "content", "sets": {dataset key: {"ref": the
    # card's reference, "fingerprint": ...}}}; a record is reused only while each still has its fingerprint.
    data: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # small JSON data for plots (first seed; "selection": all)
    model_info: dict[str, Any] = field(default_factory=dict)  # method, arch, weights source, pretrained_on
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    device: str = ""
    # How the CPU was used (threads.execution_info: intra/inter-op threads, --jobs, the OpenMP wait policy); it
    # explains wall_time_s and never changes a number, so a record is reused whatever it says.
    execution: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    images_per_second: float | None = None
    timestamp_utc: str = ""
    ranked: bool | None = None
    ci95: dict[str, list[float]] = field(default_factory=dict)
    samples: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    record_type: str = "result"

    def __post_init__(self) -> None:
        self.seeds = list(check_seeds(self.seeds))
        if not self.mean and self.per_seed:
            self.aggregate()

    @property
    def settings(self) -> dict[str, Any]:
        """The run settings the numbers were computed with (defaults for records that predate ``run_config``)."""
        return {**RUN_CONFIG_DEFAULTS, **(self.run_config or {})}

    def aggregate(self) -> None:
        names = sorted({k for m in self.per_seed.values() for k in m})
        for name in names:
            m, s = mean_std([self.per_seed[str(seed)].get(name, float("nan")) for seed in self.seeds])
            self.mean[name], self.std[name] = m, s

    @property
    def main_value(self) -> float:
        return self.mean.get(self.main_score, float("nan"))


@dataclass
class ErrorRecord(_JSONRecord):
    """A (model, task) that failed: what went wrong, so the leaderboard can show it and a re-run retries it."""

    model: str
    task: str
    task_version: int
    error_type: str
    message: str
    traceback: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    timestamp_utc: str = ""
    schema_version: int = SCHEMA_VERSION
    record_type: str = "error"


Record = ResultRecord | ErrorRecord


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def as_json(obj: Any) -> Any:
    """``obj`` as it reads back from a record's JSON (tuples as lists, numpy scalars as numbers, keys sorted)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def dumps(record: Record) -> str:
    return json.dumps(record.to_dict(), indent=2, sort_keys=True, default=_json_default, allow_nan=True) + "\n"


def write_record(record: Record, results_dir: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder + fsync + rename): readers see the old or the new file."""
    path = record_path(results_dir, record.model, record.task)

    def failed(exc: OSError) -> ResultsError:  # the disk filled up or the folder became read-only during the run
        return ResultsError(
            f"Could not write result file {str(path)!r} ({exc.strerror or type(exc).__name__}); free space or "
            "pass a writable --results DIR, then run again (results already written are kept)"
        )

    return atomic_write_text(path, dumps(record), on_error=failed)


class CorruptRecord(ProsminBenchError):
    """A result file that cannot be used: unreadable, partial, foreign, or with a field of the wrong type."""


class MisfiledRecord(CorruptRecord):
    """A valid record in a file that is not its own ``<model>/<task>.json`` (a backup copy, a renamed file)."""

    def __init__(self, message: str, record: Record) -> None:
        super().__init__(message)
        self.record = record


def read_record(path: str | os.PathLike) -> Record:
    """Read one record; raises CorruptRecord (the reason names the field) for unreadable, partial or foreign JSON
    and for records whose fields have the wrong type or disagree with each other."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    problem = record_problem(d)
    if problem is not None:
        raise CorruptRecord(f"{path}: {problem}")
    rec = ResultRecord.from_dict(d) if d["record_type"] == "result" else ErrorRecord.from_dict(d)
    # The suite writes only plain names; others would become figure and page paths outside the output folder.
    suite = getattr(rec, "suite", "mini")
    if model_folder_name(rec.model) is None or not is_safe_name(rec.task) or not is_safe_name(suite):
        raise CorruptRecord(f"{path}: model {rec.model!r}, task {rec.task!r} or suite {suite!r} is not a name "
                            f"prosmin-bench writes ({NAME_RULE})")
    return rec


def check_filed(path: str | os.PathLike, results_dir: str | os.PathLike, record: Record) -> None:
    """Raise MisfiledRecord when ``path`` is not the record's own file under ``results_dir``."""
    own = record_path(results_dir, record.model, record.task)
    here = Path(path)
    if (here.parent.name, here.name) != (own.parent.name, own.name):
        where = f"{own.parent.name}/{own.name}"
        raise MisfiledRecord(f"{path}: holds {record.model} / {record.task}, whose file is {where!r}; move it there "
                             "(or out of the results folder) to use it", record)


def scan_files(results_dir: str | os.PathLike) -> list[tuple[Path, Record | CorruptRecord]]:
    """Every ``<model>/<task>.json`` under ``results_dir``, sorted, with its record or why it cannot be used
    (a MisfiledRecord for a valid record in another pair's file)."""
    root = Path(results_dir)
    if not root.is_dir():
        return []
    out: list[tuple[Path, Record | CorruptRecord]] = []
    for path in sorted(root.glob("*/*.json")):
        try:
            rec = read_record(path)
            check_filed(path, root, rec)
        except CorruptRecord as exc:
            out.append((path, exc))
        except ProsminBenchError as exc:  # record_path refused the record's own place (e.g. a linked folder)
            out.append((path, CorruptRecord(f"{path}: {exc}")))
        else:
            out.append((path, rec))
    return out


def scan(results_dir: str | os.PathLike) -> tuple[list[Record], list[tuple[Path, str]]]:
    """All records under ``results_dir`` and the (path, reason) of every file that could not be used (unreadable,
    invalid or misfiled)."""
    records: list[Record] = []
    bad: list[tuple[Path, str]] = []
    for path, item in scan_files(results_dir):
        if isinstance(item, CorruptRecord):
            bad.append((path, str(item)))
        else:
            records.append(item)
    return records, bad
