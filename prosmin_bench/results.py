"""Typed result records that round-trip to JSON, one file per (model, task), written atomically.

``leaderboards/results/<model>/<task>.json`` is the source of truth; the leaderboard is a pure function of these
files. A failed (model, task) writes an ErrorRecord instead of crashing the suite; a later run retries it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ResultsError

log = logging.getLogger(__name__)

#: Bump when the record layout changes; readers refuse newer schemas and report older ones.
SCHEMA_VERSION = 1


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    from importlib import metadata

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


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


@dataclass
class ResultRecord:
    """The result of one task on one model over one or more seeds (sample std over seeds, ddof = 1)."""

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
    datasets: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # small JSON data for plots (first seed)
    model_info: dict[str, Any] = field(default_factory=dict)  # method, arch, weights source, pretrained_on
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    device: str = ""
    wall_time_s: float = 0.0
    images_per_second: float | None = None
    timestamp_utc: str = ""
    schema_version: int = SCHEMA_VERSION
    record_type: str = "result"

    def __post_init__(self) -> None:
        if not self.mean and self.per_seed:
            self.aggregate()

    def aggregate(self) -> None:
        names = sorted({k for m in self.per_seed.values() for k in m})
        for name in names:
            m, s = _mean_std([self.per_seed[str(seed)].get(name, float("nan")) for seed in self.seeds])
            self.mean[name], self.std[name] = m, s

    @property
    def main_value(self) -> float:
        return self.mean.get(self.main_score, float("nan"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ResultRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ErrorRecord:
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ErrorRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


Record = ResultRecord | ErrorRecord


def record_path(results_dir: str | os.PathLike, model: str, task: str) -> Path:
    """Deterministic path ``<results>/<model>/<task>.json`` (``timm:x`` becomes ``timm_x`` on disk)."""
    safe = model.replace(":", "_").replace("/", "_")
    return Path(results_dir) / safe / f"{task}.json"


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(record: Record) -> str:
    return json.dumps(record.to_dict(), indent=2, sort_keys=True, default=_json_default, allow_nan=True) + "\n"


def write_record(record: Record, results_dir: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same folder + fsync + rename): readers see the old or the new file."""
    path = record_path(results_dir, record.model, record.task)
    text = dumps(record)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # the disk filled up or the folder became read-only during the run
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ResultsError(
            f"Could not write result file {str(path)!r} ({exc.strerror or type(exc).__name__}); free space or "
            "pass a writable --results DIR, then run again (results already written are kept)"
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


class CorruptRecord(Exception):
    pass


def read_record(path: str | os.PathLike) -> Record:
    """Read one record; raises CorruptRecord for unreadable, partial or foreign JSON."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict) or "record_type" not in d or "schema_version" not in d:
        raise CorruptRecord(f"{path}: not a prosmin-bench result record")
    if d["schema_version"] > SCHEMA_VERSION:
        raise CorruptRecord(f"{path}: schema_version {d['schema_version']} is newer than this prosmin-bench "
                            f"({SCHEMA_VERSION}); upgrade prosmin-bench to read it")
    try:
        return ResultRecord.from_dict(d) if d["record_type"] == "result" else ErrorRecord.from_dict(d)
    except TypeError as exc:
        raise CorruptRecord(f"{path}: missing fields ({exc})") from None


def scan(results_dir: str | os.PathLike) -> tuple[list[Record], list[tuple[Path, str]]]:
    """All records under ``results_dir`` and the (path, reason) of every file that could not be read."""
    records: list[Record] = []
    bad: list[tuple[Path, str]] = []
    root = Path(results_dir)
    if not root.is_dir():
        return records, bad
    for path in sorted(root.glob("*/*.json")):
        try:
            records.append(read_record(path))
        except CorruptRecord as exc:
            bad.append((path, str(exc)))
    return records, bad


def check_writable(results_dir: str | os.PathLike, need_bytes: int = 1 << 20) -> Path:
    """Fail before any work starts when the results folder cannot be written (read-only, full)."""
    root = Path(results_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"Results folder {str(root)!r} cannot be created ({exc.strerror}); "
                           "pass a writable --results DIR") from None
    probe = root / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ResultsError(f"Results folder {str(root)!r} is not writable ({exc.strerror}); "
                           "free space or pass a writable --results DIR") from None
    finally:
        probe.unlink(missing_ok=True)
    try:
        free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
    except (OSError, AttributeError):
        free = need_bytes
    if free < need_bytes:
        raise ResultsError(f"Results folder {str(root)!r} has only {free} bytes free; free space or pass another --results DIR")
    return root
