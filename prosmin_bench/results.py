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
import numbers
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CacheError, ProsminBenchError, ResultsError
from .registry import NAME_RULE, is_safe_name, model_folder_name

log = logging.getLogger(__name__)

#: Bump when the record layout changes; readers refuse newer schemas and report older ones.
SCHEMA_VERSION = 1

#: Run settings that change a record's numbers (``ResultRecord.run_config``), with the values that records written
#: before these were recorded were made with: a record lacking a setting counts as made with its default here.
#: Not among them: the batch size, workers and k-NN memory (they split the same computation differently; the
#: feature cache ignores them too), the data-hash mode (how data identity is checked, not the data) and the device.
RUN_CONFIG_DEFAULTS: dict[str, str] = {"precision": "fp32", "feature_dtype": "float32"}

#: The largest seed numpy's generators accept (2**32 - 1).
MAX_SEED = 2**32 - 1


def seeds_problem(seeds: Any) -> str | None:
    """What is wrong with ``seeds`` (a sequence of distinct integers in [0, MAX_SEED], at least one), or None."""
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        return f"{type(seeds).__name__} {seeds!r} is not a sequence of seeds"
    seen: set[int] = set()
    values = list(seeds)
    if not values:
        return "no seed was given"
    for s in values:
        if not isinstance(s, numbers.Integral) or isinstance(s, bool):
            return f"{s!r} is not an integer"
        if not 0 <= int(s) <= MAX_SEED:
            return f"{int(s)} is outside [0, {MAX_SEED}] (numpy's seed range)"
        if int(s) in seen:  # a repeated seed would count twice in the mean and give a std of 0
            return f"seed {int(s)} is repeated"
        seen.add(int(s))
    return None


def check_seeds(seeds: Any) -> tuple[int, ...]:
    """``seeds`` as a tuple of ints, or a ProsminBenchError saying what is wrong with them."""
    if hasattr(seeds, "__iter__") and not isinstance(seeds, (str, bytes)):
        seeds = list(seeds)  # read a generator once
    problem = seeds_problem(seeds)
    if problem is not None:
        raise ProsminBenchError(f"Expected `seeds` to be distinct integers from 0 to {MAX_SEED}, at least one, but "
                                f"got {seeds!r}: {problem}")
    return tuple(int(s) for s in seeds)


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
    run_config: dict[str, Any] = field(default_factory=dict)  # RUN_CONFIG_DEFAULTS keys: precision, feature_dtype
    datasets: dict[str, Any] = field(default_factory=dict)
    # The identity of every dataset the task read: {"hash": "stat" | "content", "sets": {dataset key: {"ref": the
    # card's reference, "fingerprint": ...}}}; a record is reused only while each still has its fingerprint.
    data: dict[str, Any] = field(default_factory=dict)
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


def inside(root: str | os.PathLike, *parts: str, what: str = "file") -> Path:
    """``root / parts...``, refused with a ResultsError when it resolves (links followed) outside ``root``: names
    from cards, records and the command line become path components, and none may write elsewhere."""
    path = Path(root).joinpath(*parts)
    base = Path(root).resolve()
    if not path.resolve().is_relative_to(base):
        raise ResultsError(
            f"Refusing to use {what} {str(path)!r}: it leads outside {str(root)!r}; names must be {NAME_RULE}, "
            "and folders inside it must not be links to elsewhere"
        )
    return path


def record_path(results_dir: str | os.PathLike, model: str, task: str) -> Path:
    """Deterministic path ``<results>/<model>/<task>.json``; ``timm:<name>`` is stored as ``timm--<name>``.

    Raises ResultsError when ``model`` or ``task`` cannot be a file name (``registry.NAME_PATTERN``).
    """
    folder = model_folder_name(model)
    if folder is None or not is_safe_name(task):
        bad, kind = (model, "model") if folder is None else (task, "task")
        raise ResultsError(
            f"Expected a {kind} name of {NAME_RULE} (or timm:<name> for a model), but got {bad!r}: it would be "
            f"written outside the results folder; rename it"
        )
    return inside(results_dir, folder, f"{task}.json", what="result file")


def safe_lock_path(path: str | os.PathLike) -> Path:
    """The lock file that guards the record ``path`` (``<path>.lock``), refused when it is a symbolic link: taking
    the lock opens it for writing with truncation, which through a link would empty the file it points to."""
    lock = Path(f"{path}.lock")
    if lock.is_symlink():
        raise ResultsError(
            f"Lock file {str(lock)!r} is a symbolic link (to {os.readlink(lock)!r}); prosmin-bench never makes "
            "links there: remove it and run again"
        )
    return lock


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
            _remove_quietly(Path(tmp))
        raise ResultsError(
            f"Could not write result file {str(path)!r} ({exc.strerror or type(exc).__name__}); free space or "
            "pass a writable --results DIR, then run again (results already written are kept)"
        ) from None
    except BaseException:
        if tmp is not None:
            _remove_quietly(Path(tmp))
        raise
    return path


class CorruptRecord(ProsminBenchError):
    """A result file that cannot be used: unreadable, partial, foreign, or with a field of the wrong type."""


class MisfiledRecord(CorruptRecord):
    """A valid record in a file that is not its own ``<model>/<task>.json`` (a backup copy, a renamed file)."""

    def __init__(self, message: str, record: Record) -> None:
        super().__init__(message)
        self.record = record


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _got(value: Any) -> str:
    """``value`` for a message: its JSON type and (shortened) text."""
    if value is None:
        return "null"
    text = json.dumps(value, allow_nan=True, default=str)
    return f"{_json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: (what a field must be, the check) for each field of a record file.
_STR = ("a string", lambda v: isinstance(v, str))
_NAME = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
_INT = ("an integer", _is_int)
_NUMBER = ("a number", _is_number)
_OPT_NUMBER = ("a number or null", lambda v: v is None or _is_number(v))
_OPT_STR = ("a string or null", lambda v: v is None or isinstance(v, str))
_OBJECT = ("an object", lambda v: isinstance(v, dict))
_LIST = ("a list", lambda v: isinstance(v, list))

#: field -> (required, (what it must be, check)); required: written by every version of the suite.
_RESULT_FIELDS: dict[str, tuple[bool, tuple[str, Any]]] = {
    "model": (True, _NAME), "task": (True, _NAME), "task_version": (True, _INT), "task_kind": (True, _STR),
    "suite": (True, _STR), "main_score": (True, _NAME), "weights_sha256": (True, _STR), "seeds": (True, _LIST),
    "per_seed": (True, _OBJECT), "mean": (True, _OBJECT), "std": (True, _OBJECT),
    "protocol": (False, _OBJECT), "run_config": (False, _OBJECT), "datasets": (False, _OBJECT), "data": (False, _OBJECT),
    "extras": (False, _OBJECT), "model_info": (False, _OBJECT), "versions": (False, _OBJECT),
    "git_commit": (False, _OPT_STR), "device": (False, _STR), "wall_time_s": (False, _NUMBER),
    "images_per_second": (False, _OPT_NUMBER), "timestamp_utc": (False, _STR),
}
_ERROR_FIELDS: dict[str, tuple[bool, tuple[str, Any]]] = {
    "model": (True, _NAME), "task": (True, _NAME), "task_version": (True, _INT), "error_type": (True, _STR),
    "message": (True, _STR), "traceback": (False, _STR), "versions": (False, _OBJECT),
    "git_commit": (False, _OPT_STR), "timestamp_utc": (False, _STR),
}


def _same(recorded: Any, computed: float) -> bool:
    a = float("nan") if recorded is None else float(recorded)
    if math.isnan(a) or math.isnan(computed):
        return math.isnan(a) and math.isnan(computed)
    return math.isclose(a, computed, rel_tol=1e-9, abs_tol=1e-12)


def _result_problem(d: dict[str, Any]) -> str | None:
    """The cross-field checks of a result record whose fields have the right types."""
    seeds, per_seed = d["seeds"], d["per_seed"]
    problem = seeds_problem(seeds)
    if problem is not None:
        return f"field 'seeds' must be distinct integers from 0 to {MAX_SEED}, at least one, but {problem}"
    for key, metrics in per_seed.items():
        if not isinstance(metrics, dict):
            return f"field 'per_seed' must map each seed to an object of metrics, but seed {key!r} has {_got(metrics)}"
        for name, value in metrics.items():
            if value is not None and not _is_number(value):
                return f"field 'per_seed' holds {_got(value)} for metric {name!r} of seed {key!r}; expected a number"
    if sorted(per_seed) != sorted(str(s) for s in seeds):
        return (f"field 'seeds' {seeds} does not match the seeds of field 'per_seed' "
                f"{sorted(per_seed, key=lambda k: (len(k), k))}")
    names = sorted({m for metrics in per_seed.values() for m in metrics})
    for agg in ("mean", "std"):
        for name, value in d[agg].items():
            if value is not None and not _is_number(value):
                return f"field '{agg}' holds {_got(value)} for metric {name!r}; expected a number"
        if sorted(d[agg]) != names:
            return (f"field '{agg}' has metrics {sorted(d[agg])}, but field 'per_seed' has {names}; each metric "
                    "needs its mean and std over the seeds")
    if d["main_score"] not in d["mean"]:
        return f"field 'main_score' names {d['main_score']!r}, which is not one of the record's metrics {names}"
    for name in names:  # a mean that disagrees with its per-seed values would be a silent wrong number
        m, sd = _mean_std([per_seed[str(s)].get(name, float("nan")) for s in seeds])
        for agg, computed in (("mean", m), ("std", sd)):
            if not _same(d[agg][name], computed):
                return (f"field '{agg}' gives {d[agg][name]!r} for metric {name!r}, but its values in field "
                        f"'per_seed' give {computed!r}")
    for key, value in d.get("run_config", {}).items():
        if not isinstance(value, str):
            return f"field 'run_config' holds {_got(value)} for {key!r}; expected a string"
    return None


def record_problem(d: Any) -> str | None:
    """What makes the decoded JSON ``d`` not a usable record (naming the field), or None when it is one."""
    if not isinstance(d, dict) or "record_type" not in d or "schema_version" not in d:
        return "not a prosmin-bench result record"
    version = d["schema_version"]
    if not _is_int(version) or version < 1:
        return f"field 'schema_version' must be a positive integer, but got {_got(version)}"
    if version > SCHEMA_VERSION:
        return (f"schema_version {version} is newer than this prosmin-bench ({SCHEMA_VERSION}); upgrade prosmin-bench "
                "to read it")
    kinds = {"result": _RESULT_FIELDS, "error": _ERROR_FIELDS}
    if d["record_type"] not in kinds:
        return f"field 'record_type' must be \"result\" or \"error\", but got {_got(d['record_type'])}"
    fields = kinds[d["record_type"]]
    missing = [name for name, (required, _) in fields.items() if required and name not in d]
    if missing:
        return f"missing fields: {', '.join(missing)}"
    for name, (_, (what, ok)) in fields.items():
        if name in d and not ok(d[name]):
            return f"field {name!r} must be {what}, but got {_got(d[name])}"
    return _result_problem(d) if d["record_type"] == "result" else None


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


def _remove_quietly(path: Path) -> None:
    """Remove a temporary file on an error path; a failure here (a folder turned read-only) must not replace the
    error being reported."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)


def _unwritable(folder: Path) -> OSError | None:
    """Why a 4 KiB file cannot be written and synced in ``folder`` (None when it can); the probe is removed."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    finally:
        _remove_quietly(probe)
    return None


def _free_bytes(folder: Path, default: int) -> int:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return default
    return st.f_bavail * st.f_frsize


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def folder_write_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder`` (creating it as needed), or None when they can: a file where a
    folder must be, or a refused write in the nearest folder that exists. Creates nothing."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if not path.exists():
            continue
        if not path.is_dir():
            return f"{str(path)!r} is a file, not a folder"
        probe = path / f".write-test-{os.getpid()}"
        try:
            with open(probe, "wb"):
                pass
        except OSError as exc:
            return f"{str(path)!r} is not writable ({exc.strerror or type(exc).__name__})"
        finally:
            probe.unlink(missing_ok=True)
        return None
    return None


def check_writable(results_dir: str | os.PathLike, need_bytes: int = 1 << 20) -> Path:
    """Fail before any work starts when the results folder cannot be written (read-only, full)."""
    root = Path(results_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"Results folder {str(root)!r} cannot be created ({_reason(exc)}); "
                           "pass a writable --results DIR") from None
    exc = _unwritable(root)
    if exc is not None:
        raise ResultsError(f"Results folder {str(root)!r} is not writable ({_reason(exc)}); "
                           "free space or pass a writable --results DIR")
    free = _free_bytes(root, need_bytes)
    if free < need_bytes:
        raise ResultsError(f"Results folder {str(root)!r} has only {free} bytes free; free space or pass another "
                           "--results DIR")
    return root


def check_cache_writable(need_bytes: int = 1 << 20) -> Path:
    """Fail before any work starts when the cache (``PROSMIN_BENCH_HOME``: features, heads, checkpoints) cannot
    be written; otherwise every (model, task) would fail on its own with a bare OS error."""
    from . import config

    root = config.home()
    todo = f"set {config.HOME_ENV} to a writable folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) cannot be created ({_reason(exc)}); "
                         f"{todo}") from None
    exc = _unwritable(root)
    if exc is not None:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) is not writable ({_reason(exc)}); "
                         f"free space or {todo}")
    free = _free_bytes(root, need_bytes)
    if free < need_bytes:
        raise CacheError(f"Cache folder {str(root)!r} ({config.HOME_ENV}) has only {free} bytes free; free space "
                         f"or {todo}")
    return root
