"""What makes decoded JSON a usable result record: the schema version, the seed rules, the type of every field
and the agreement between fields (a mean that disagrees with its per-seed values would be a silent wrong number).

``record_problem`` names the first problem (the field and what it holds); ``results.read_record`` turns it into a
``CorruptRecord``. The seed rules live here too because records, the runner and the command line share them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
import struct
from typing import Any

from .errors import ProsminBenchError

#: Bump when the record layout changes; readers refuse newer schemas and report older ones. Still 1 after
#: ``ranked``, ``ci95`` and ``samples`` were added: they are optional (records without them stay valid and show no
#: interval) and readers ignore fields they do not know, so records of either side read on the other; a bump would
#: only make older installations refuse the new records.
SCHEMA_VERSION = 1

#: ``samples.kind`` -> the encodings it may be stored with (``record_samples``).
SAMPLE_ENCODINGS: dict[str, tuple[str, ...]] = {
    "mean": ("bits", "float16", "float32"), "auroc": ("float32",), "replicates": ("float32",),
}
#: ``samples.kind`` -> how many groups of values each seed has (ID and OOD for an AUROC).
_SAMPLE_GROUPS = {"mean": 1, "auroc": 2, "replicates": 1}

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


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for one value) of the finite values; both NaN when there are none."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, sd


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
    "git_commit": (False, _OPT_STR), "device": (False, _STR), "execution": (False, _OBJECT),
    "wall_time_s": (False, _NUMBER), "images_per_second": (False, _OPT_NUMBER), "timestamp_utc": (False, _STR),
    "ranked": (False, ("a boolean or null", lambda v: v is None or isinstance(v, bool))),  # null: before it existed
    "ci95": (False, _OBJECT), "samples": (False, _OBJECT),
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
        m, sd = mean_std([per_seed[str(s)].get(name, float("nan")) for s in seeds])
        for agg, computed in (("mean", m), ("std", sd)):
            if not _same(d[agg][name], computed):
                return (f"field '{agg}' gives {d[agg][name]!r} for metric {name!r}, but its values in field "
                        f"'per_seed' give {computed!r}")
    for key, value in d.get("run_config", {}).items():
        if not isinstance(value, str):
            return f"field 'run_config' holds {_got(value)} for {key!r}; expected a string"
    for name, value in d.get("ci95", {}).items():
        if name not in names:
            return f"field 'ci95' has an interval for {name!r}, which is not one of the record's metrics"
        if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) and math.isfinite(v) for v in value)
                and value[0] <= value[1]):
            return (f"field 'ci95' holds {_got(value)} for {name!r}; expected [low, high], two finite numbers with "
                    "low <= high")
    if d.get("samples"):
        return _samples_problem(d["samples"], seeds, d["main_score"])
    return None


def _sample_bytes(encoding: str, n: int) -> int:
    return (n + 7) // 8 if encoding == "bits" else n * (2 if encoding == "float16" else 4)


def _samples_problem(s: dict[str, Any], seeds: list[int], main_score: str) -> str | None:
    """What is wrong with a record's ``samples`` (layout in ``record_samples``), or None."""
    if s.get("metric") != main_score:
        return f"field 'samples' describes {_got(s.get('metric'))}, not the main score {main_score!r}"
    kind, encoding, n = s.get("kind"), s.get("encoding"), s.get("n")
    if kind not in SAMPLE_ENCODINGS:
        return f"field 'samples.kind' must be one of {sorted(SAMPLE_ENCODINGS)}, but got {_got(kind)}"
    if encoding not in SAMPLE_ENCODINGS[kind]:
        return (f"field 'samples.encoding' must be one of {list(SAMPLE_ENCODINGS[kind])} for kind {kind!r}, but got "
                f"{_got(encoding)}")
    groups = _SAMPLE_GROUPS[kind]
    if not (isinstance(n, list) and len(n) == groups and all(_is_int(v) and v >= 1 for v in n)):
        return f"field 'samples.n' must be {groups} positive integer(s) for kind {kind!r}, but got {_got(n)}"
    per_seed = s.get("per_seed")
    if not isinstance(per_seed, dict) or sorted(per_seed) != sorted(str(x) for x in seeds):
        return f"field 'samples.per_seed' must hold the record's seeds {seeds}, but got {_got(per_seed)}"
    for seed, texts in per_seed.items():
        if not (isinstance(texts, list) and len(texts) == groups and all(isinstance(t, str) for t in texts)):
            return f"field 'samples.per_seed' holds {_got(texts)} for seed {seed}; expected {groups} base64 string(s)"
        for size, text in zip(n, texts):
            try:
                raw = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                return f"field 'samples.per_seed' holds text that is not base64 for seed {seed}"
            if len(raw) != _sample_bytes(encoding, size):
                return (f"field 'samples.per_seed' holds {len(raw)} bytes for seed {seed}; {size} values in "
                        f"{encoding} take {_sample_bytes(encoding, size)}")
            if encoding != "bits" and not all(math.isfinite(v) for (v,) in struct.iter_unpack(
                    "<e" if encoding == "float16" else "<f", raw)):
                return f"field 'samples.per_seed' holds a NaN or infinite value for seed {seed}"
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
