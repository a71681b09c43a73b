"""Result records (issue 15): a record is reused or tabulated only when everything that determines it matches, and
a malformed or misplaced one is one clear line, never a traceback or a silently wrong number.

Driven through the command line (``prosmin_bench.cli.main`` in-process) like tests/test_faults.py, whose fixtures
and helpers these tests share; each asserts the message a user sees and the state of the results folder after.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from prosmin_bench import evaluate
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.paths import record_path
from prosmin_bench.results import RUN_CONFIG_DEFAULTS, ResultRecord, dumps, read_record, scan
from prosmin_bench.reuse import _existing_ok, run_settings
from prosmin_bench.runner import RunOptions
from prosmin_bench.tasks import get_task_spec
from test_faults import (  # noqa: F401  (fixtures)
    PREFIX, assert_one_line_error, cards_dir, cli, json_files, make_toy, no_forward,
)

REPO = Path(__file__).resolve().parent.parent
UNREADABLE = "## Unreadable result files (ignored; re-run to recompute)"
MISFILED = "## Misfiled records (not tabulated)"


def toy_run(cards_dir: Path, data: Path, res: Path, *extra: str) -> list[str]:
    return ["--cards", str(cards_dir), "run", "--model", "random_micro", "--task", "toy_knn", "--data-root",
            str(data), "--num-workers", "0", "--results", str(res), *extra]


@pytest.fixture
def toy(tmp_path, cards_dir, capsys) -> tuple[list[str], Path]:
    """A results folder holding one finished record, random_micro / toy_knn, and the run that made it."""
    data, res = make_toy(tmp_path / "data"), tmp_path / "res"
    run = toy_run(cards_dir, data, res)
    code, _, err = cli(capsys, "-q", *run)
    assert code == 0, err
    return run, record_path(res, "random_micro", "toy_knn")


def rewrite(path: Path, **changes) -> None:
    """Rewrite the record at ``path`` with fields changed (mean and std recomputed, so it stays consistent)."""
    d = json.loads(path.read_text())
    d.update(changes)
    rec = ResultRecord.from_dict({**d, "mean": {}, "std": {}})
    path.write_text(dumps(rec))


# ---------------------------------------------------------------------------------------------------------------
# 4. Precision and stored feature dtype are part of a record's identity.


def test_precision_and_feature_dtype_are_part_of_the_records_identity(toy, capsys):
    run, path = toy
    assert read_record(path).run_config == {"precision": "fp32", "feature_dtype": "float32", "knn_backend": "torch"}
    for flags, changed in [(["--precision", "bf16"], {"precision": "bf16"}),
                           (["--feature-dtype", "float16"], {"feature_dtype": "float16"}),
                           (["--knn-backend", "faiss"], {"knn_backend": "faiss"}), ([], {})]:
        expected = {"precision": "fp32", "feature_dtype": "float32", "knn_backend": "torch", **changed}
        code, _, err = cli(capsys, *run, *flags)
        assert code == 0, err
        assert "up to date" not in err and "recomputing with" in err, err
        assert read_record(path).run_config == expected
    before = path.read_bytes()
    code, _, err = cli(capsys, *run)  # the same settings again: reused as it is
    assert code == 0 and "random_micro / toy_knn: up to date" in err, err
    assert path.read_bytes() == before


def test_records_from_before_run_config_count_as_fp32(toy, capsys):
    run, path = toy
    d = json.loads(path.read_text())
    del d["run_config"]
    path.write_text(json.dumps(d))
    before = path.read_bytes()
    code, _, err = cli(capsys, *run)
    assert code == 0 and "up to date" in err and path.read_bytes() == before, err
    code, _, err = cli(capsys, *run, "--precision", "fp16")
    assert code == 0 and "up to date" not in err, err
    assert read_record(path).run_config["precision"] == "fp16"


def test_committed_records_count_as_made_with_the_default_settings():
    records, bad = scan(REPO / "leaderboards" / "results")
    assert records and bad == []
    path = REPO / "leaderboards" / "results" / "random_micro" / "digits_knn.json"
    rec = read_record(path)
    # Regenerated with the default settings (records without run_config count as those too: the test above)
    # (the committed records predate knn_backend: they lack the key and count as "torch")
    assert json.loads(path.read_text())["run_config"].items() <= RUN_CONFIG_DEFAULTS.items()
    assert rec.settings == RUN_CONFIG_DEFAULTS
    spec = get_task_spec("digits_knn")
    ok = dict(path=path, spec=spec, seeds=rec.seeds, sha=rec.weights_sha256, model=rec.model)
    assert _existing_ok(**ok, settings=run_settings(RunOptions())) is not None
    assert _existing_ok(**ok, settings=run_settings(RunOptions(precision="bf16"))) is None


def test_a_record_is_reused_only_while_its_data_is_unchanged(tmp_path, toy, capsys):
    """Test images swapped for the other class's (same names, same byte size: what a stale cache key would miss):
    the record is recomputed and the number follows the data; an unchanged folder is reused as it is."""
    run, path = toy
    rec = read_record(path)
    assert rec.data["hash"] == "stat" and sorted(rec.data["sets"]) == [
        f"root=toy/{split},source=imagefolder" for split in ("test", "train")]
    assert rec.mean["top1_k5"] == 1.0
    data = Path(run[run.index("--data-root") + 1]) / "toy" / "test"
    for i in range(3):  # a <-> b: every test label is now wrong for its pixels
        a, b = data / "a" / f"{i}.png", data / "b" / f"{i}.png"
        pa, pb = a.read_bytes(), b.read_bytes()
        a.write_bytes(pb), b.write_bytes(pa)
        os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))
        os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns + 10**9))
    code, _, err = cli(capsys, *run)
    assert code == 0, err
    assert "has changed since it was computed; recomputing it" in err and "up to date" not in err, err
    assert read_record(path).mean["top1_k5"] == 0.0
    before = path.read_bytes()
    code, _, err = cli(capsys, *run)
    assert code == 0 and "random_micro / toy_knn: up to date" in err and path.read_bytes() == before, err


def test_a_record_that_does_not_say_which_data_it_used_is_recomputed(toy, capsys):
    run, path = toy
    d = json.loads(path.read_text())
    del d["data"]  # as records written before data identities were recorded
    path.write_text(json.dumps(d))
    code, _, err = cli(capsys, *run)
    assert code == 0 and "it does not record the data it was computed on; recomputing it" in err, err
    assert read_record(path).data["sets"]


def test_a_protocol_edited_without_a_version_bump_is_recomputed(toy, cards_dir, capsys):
    run, path = toy
    card = cards_dir / "toy_knn.toml"
    card.write_text(card.read_text().replace("ks = [5]", "ks = [5]\ntemperature = 0.5"))
    code, _, err = cli(capsys, *run)
    assert code == 0 and "recomputing with" in err and "up to date" not in err, err
    assert read_record(path).protocol["temperature"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# 7. A record filed under another pair's name is never tabulated (nor reused).


def test_misfiled_records_are_listed_and_never_tabulated(toy, cards_dir, capsys):
    _, path = toy
    res = path.parent.parent
    real = read_record(path).mean["top1_k5"]
    for copy in (res / "random_micro_backup" / "toy_knn.json", res / "random_micro" / "toy_knn_old.json"):
        copy.parent.mkdir(exist_ok=True)
        shutil.copy(path, copy)
        rewrite(copy, per_seed={"0": {**read_record(path).per_seed["0"], "top1_k5": 0.123456}})
    for args in ([], ["--suite", "mini"]):
        code, out, err = cli(capsys, "--cards", str(cards_dir), "leaderboard", "--results", str(res), *args)
        assert code == 0 and "Traceback" not in err, err
        section = out[out.index(MISFILED):]
        assert ("`random_micro/toy_knn_old.json`: holds random_micro / toy_knn, whose file is "
                "'random_micro/toy_knn.json'; move it there (or out of the results folder) to use it") in section
        assert "`random_micro_backup/toy_knn.json`: holds random_micro / toy_knn" in section
        tables = out[:out.index(MISFILED)]
        assert "12.35" not in tables and f"{100 * real:.2f}" in tables
        assert "random_micro_backup" not in tables
    assert len(scan(res)[0]) == 1  # load_results and every other reader skip them too


def test_a_record_of_another_pair_in_this_pairs_file_is_recomputed(toy, capsys):
    run, path = toy
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "model": "dino_micro"}))  # same weights sha: only the names differ
    code, _, err = cli(capsys, *run)
    assert code == 0, err
    assert f"ignoring result file {path}: it holds dino_micro / toy_knn, not random_micro / toy_knn" in err
    assert "up to date" not in err and read_record(path).model == "random_micro"


# ---------------------------------------------------------------------------------------------------------------
# 8. Seeds: repeated ones would be counted twice ("2 seeds, ± 0.00"); negative or huge ones fail in numpy.


@pytest.mark.parametrize("seeds, problem", [
    ("1,1", "seed 1 is repeated"),
    ("0 1 0", "seed 0 is repeated"),
    ("-1", "-1 is outside [0, 4294967295] (numpy's seed range)"),
    ("4294967296", "4294967296 is outside [0, 4294967295] (numpy's seed range)"),
    ("", "no seed was given"),
    ("1,x", None),
])
def test_bad_seeds_are_refused_when_the_arguments_are_parsed(tmp_path, capsys, no_forward, seeds, problem):
    res = tmp_path / "res"
    with pytest.raises(SystemExit) as exit_info:
        cli(capsys, "run", "--model", "random_micro", "--task", "digits_knn", f"--seeds={seeds}", "--results",
            str(res))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    expected = (f"prosmin-bench run: error: argument --seeds: expected distinct integer seeds from 0 to 4294967295 "
                f"like '0,1,2', but got {seeds!r}")
    assert err.splitlines()[-1] == expected + (f": {problem}" if problem else ""), err
    assert no_forward == [] and not res.exists()


@pytest.mark.parametrize("seeds, problem", [
    ((1, 1), "seed 1 is repeated"), ([0, -3], "-3 is outside"), ((2**32,), "4294967296 is outside"),
    ((), "no seed was given"), ((0, 1.5), "1.5 is not an integer"), ((True,), "True is not an integer"),
])
def test_the_library_refuses_bad_seeds_too(tmp_path, no_forward, seeds, problem):
    start = "Expected `seeds` to be distinct integers from 0 to 4294967295, at least one, but got"
    with pytest.raises(ProsminBenchError, match=r"^Expected `seeds`") as e:
        evaluate("random_micro", "digits_knn", seeds=seeds, device="cpu", results_dir=tmp_path / "res")
    assert str(e.value).startswith(start) and problem in str(e.value)
    with pytest.raises(ProsminBenchError, match=re.escape(problem)):
        RunOptions(seeds=seeds)
    opts = RunOptions(seeds=(0,), device="cpu", results_dir=tmp_path / "res")
    opts.seeds = seeds  # changed after the options were checked: evaluate checks them again
    with pytest.raises(ProsminBenchError, match="Expected `seeds`"):
        evaluate("random_micro", "digits_knn", options=opts)
    with pytest.raises(ProsminBenchError, match="Expected `seeds`"):
        ResultRecord(model="m", task="t", task_version=1, task_kind="knn", suite="mini", main_score="top1",
                     weights_sha256="0" * 64, seeds=list(seeds), per_seed={str(s): {"top1": 0.5} for s in seeds})
    assert no_forward == [] and not (tmp_path / "res").exists()


def test_seeds_given_as_numpy_integers_are_plain_ints_in_the_record():
    import numpy as np

    rec = ResultRecord(model="m", task="t", task_version=1, task_kind="knn", suite="mini", main_score="top1",
                       weights_sha256="0" * 64, seeds=[np.int64(3)], per_seed={"3": {"top1": 0.5}})
    assert rec.seeds == [3] and type(rec.seeds[0]) is int and RunOptions(seeds=[np.int32(2)]).seeds == (2,)


# ---------------------------------------------------------------------------------------------------------------
# 11. A read-only results folder or cache (a real `ro` mount gives EROFS on every write, unlink and mkdir, also
# where root could write through permission bits): one line before any work.


def deny_writes(monkeypatch, folder: Path, err: int) -> None:
    """Make ``folder`` behave like a read-only mount (``err`` = EROFS) or a folder without write permission
    (EACCES): opening for writing, creating, removing and renaming under it fail."""
    inside = str(folder)

    def under(p) -> bool:
        return isinstance(p, (str, os.PathLike)) and os.fspath(p).startswith(inside)

    def fail(p):
        raise OSError(err, os.strerror(err), os.fspath(p))

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *a, **k):
        if under(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    for name in ("unlink", "remove", "mkdir", "rmdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, _real=real, **k: fail(p) if under(p) else _real(p, *a, **k))
    for name in ("replace", "rename"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda s, d, *a, _real=real, **k: fail(d) if under(d) or under(s)
                            else _real(s, d, *a, **k))


@pytest.mark.parametrize("err, reason", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
                         ids=["read-only-mount", "no-write-permission"])
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_read_only_results_folder_is_one_line_before_any_work(tmp_path, cards_dir, capsys, no_forward, err, reason,
                                                              exists):
    ro = tmp_path / "ro"
    ro.mkdir()
    res = ro / "res" if not exists else ro
    with pytest.MonkeyPatch.context() as mp:
        deny_writes(mp, ro, err)
        code, _, stderr = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                              "fault_knn", "--results", str(res))
    what = "is not writable" if exists else "cannot be created"
    assert_one_line_error(code, stderr, f"Results folder {str(res)!r} {what} ({reason})",
                          "pass a writable --results DIR")
    assert no_forward == [] and list(ro.iterdir()) == []


@pytest.mark.parametrize("err, reason", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
                         ids=["read-only-mount", "no-write-permission"])
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_read_only_cache_is_one_line_before_any_work(tmp_path, cards_dir, capsys, monkeypatch, no_forward, err,
                                                     reason, exists):
    ro, res = tmp_path / "ro_home", tmp_path / "res"
    ro.mkdir()
    home = ro if exists else ro / "cache"
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(home))
    with pytest.MonkeyPatch.context() as mp:
        if err == errno.EACCES and os.geteuid() != 0:
            ro.chmod(0o500)  # the real thing where permission bits apply (they do not stop root)
        else:
            deny_writes(mp, ro, err)
        try:
            code, _, stderr = cli(capsys, "--cards", str(cards_dir), "run", "--model", "random_micro", "--task",
                                  "fault_knn", "--results", str(res))
        finally:
            ro.chmod(0o755)
    what = "is not writable" if exists else "cannot be created"
    assert_one_line_error(code, stderr, f"Cache folder {str(home)!r} (PROSMIN_BENCH_HOME) {what} ({reason})",
                          "set PROSMIN_BENCH_HOME to a writable folder")
    assert no_forward == [] and json_files(res) == [] and list(ro.iterdir()) == []


def test_failed_cleanup_of_a_temporary_record_does_not_hide_the_write_error(toy, capsys, monkeypatch):
    run, path = toy
    res = path.parent.parent
    real_replace, real_unlink = os.replace, os.unlink

    def read_only_unlink(p, *a, **k):
        if str(p).startswith(str(res)):
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return real_unlink(p, *a, **k)

    def folder_turns_read_only(src, dst, *a, **k):  # after the start-up check passed: remounted read-only
        if str(dst).startswith(str(res)):
            monkeypatch.setattr(os, "unlink", read_only_unlink)
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", folder_turns_read_only)
    before = path.read_bytes()
    code, _, err = cli(capsys, "-q", *run, "--overwrite")
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1] == (f"{PREFIX}Could not write result file {str(path)!r} (Read-only file system); "
                                    "free space or pass a writable --results DIR, then run again (results already "
                                    "written are kept)")
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# 12. Records with fields of the wrong type: listed by the leaderboard with the field named, recomputed by `run`.


def _set(*keys, value):
    def change(d):
        target = d
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


def _drop(key):
    return lambda d: d.pop(key)


MALFORMED = [
    ("seeds-null", _set("seeds", value=None), "field 'seeds' must be a list, but got null"),
    ("seeds-repeated", _set("seeds", value=[0, 0]), "field 'seeds' must be distinct integers from 0 to 4294967295, "
                                                     "at least one, but seed 0 is repeated"),
    ("seeds-not-per-seed", _set("seeds", value=[1]), "field 'seeds' [1] does not match the seeds of field 'per_seed' "
                                                     "['0']"),
    ("per-seed-list", _set("per_seed", value=[0.5]), "field 'per_seed' must be an object, but got a list [0.5]"),
    ("per-seed-entry-number", _set("per_seed", "0", value=0.5),
     "field 'per_seed' must map each seed to an object of metrics, but seed '0' has a number 0.5"),
    ("model-int", _set("model", value=123), "field 'model' must be a non-empty string, but got an integer 123"),
    ("schema-version-str", _set("schema_version", value="1"),
     "field 'schema_version' must be a positive integer, but got a string \"1\""),
    ("task-version-float", _set("task_version", value=1.5), "field 'task_version' must be an integer, but got a "
                                                            "number 1.5"),
    ("metric-str", _set("per_seed", "0", "top1_k5", value="0.9"),
     "field 'per_seed' holds a string \"0.9\" for metric 'top1_k5' of seed '0'; expected a number"),
    ("mean-missing", _drop("mean"), "missing fields: mean"),
    ("std-missing", _drop("std"), "missing fields: std"),
    ("mean-value-str", _set("mean", "top1_k5", value="high"),
     "field 'mean' holds a string \"high\" for metric 'top1_k5'; expected a number"),
    ("mean-disagrees", _set("mean", "top1_k5", value=0.99),
     "field 'mean' gives 0.99 for metric 'top1_k5', but its values in field 'per_seed' give"),
    ("main-score-absent", _set("main_score", value="top1_k99"),
     "field 'main_score' names 'top1_k99', which is not one of the record's metrics"),
    ("record-type", _set("record_type", value="resulting"),
     "field 'record_type' must be \"result\" or \"error\", but got a string \"resulting\""),
    ("run-config-list", _set("run_config", value=["fp32"]), "field 'run_config' must be an object, but got a list"),
    ("wall-time-str", _set("wall_time_s", value="1s"), "field 'wall_time_s' must be a number, but got a string"),
    ("error-message-null", lambda d: d.update(record_type="error", error_type="DataError", message=None),
     "field 'message' must be a string, but got null"),
]


@pytest.mark.parametrize("change, reason", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_record_is_listed_then_recomputed(toy, cards_dir, capsys, change, reason):
    run, path = toy
    res = path.parent.parent
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    for args in ([], ["--suite", "mini"]):
        code, out, err = cli(capsys, "--cards", str(cards_dir), "leaderboard", "--results", str(res), *args)
        assert code == 0 and "Traceback" not in err, err
        assert f"- `random_micro/toy_knn.json`: {reason}" in out[out.index(UNREADABLE):], out
    code, out, err = cli(capsys, *run)
    assert code == 0 and "Traceback" not in err, err
    assert f"ignoring unreadable result file {path} ({path}: {reason}" in err and "it will be recomputed" in err
    rec = read_record(path)
    assert isinstance(rec, ResultRecord) and rec.seeds == [0] and scan(res)[1] == []
    (row,) = [line for line in out.splitlines() if line.startswith("random_micro ")]  # run's console table
    assert row.split()[1] == "toy_knn@1" and "  computed (" in row, out


# ---------------------------------------------------------------------------------------------------------------
# Unreadable files are listed by every view of the leaderboard, also when nothing else can be read.


@pytest.mark.parametrize("args", [[], ["--suite", "mini"], ["--suite", "imagenet"]], ids=["all", "mini", "imagenet"])
def test_a_folder_of_only_unreadable_files_still_lists_them(tmp_path, capsys, args):
    res = tmp_path / "res"
    (res / "random_micro").mkdir(parents=True)
    (res / "random_micro" / "digits_knn.json").write_text('{"model": "random_micro", "per_seed": {"0": {"top1')
    (res / "random_micro" / "digits_o.json").write_text(json.dumps({"record_type": "result", "schema_version": 1,
                                                                     "model": "random_micro", "seeds": None}))
    code, out, err = cli(capsys, "leaderboard", "--results", str(res), *args)
    assert code == 0 and "Traceback" not in err, err
    section = out[out.index(UNREADABLE):]
    assert "- `random_micro/digits_knn.json`: not valid JSON" in section
    assert "- `random_micro/digits_o.json`: missing fields: task, task_version" in section


def test_every_record_names_the_data_it_read_even_when_an_earlier_task_extracted_it(tmp_path, capsys):
    """digits_collapse reads digits:test, whose features digits_knn extracted earlier in the same run: its record
    must still name that dataset, or it could never be reused (nor its data checked)."""
    res = tmp_path / "res"
    code, _, err = cli(capsys, "-q", "run", "--model", "random_micro", "--task", "digits_knn", "--task",
                       "digits_collapse", "--seeds", "0", "--results", str(res))
    assert code == 0, err
    for task in ("digits_knn", "digits_collapse"):
        sets = read_record(record_path(res, "random_micro", task)).data["sets"]
        assert any(key.startswith("digits@") and key.endswith(":test") for key in sets), (task, sets)
    code, _, err = cli(capsys, "run", "--model", "random_micro", "--task", "digits_collapse", "--seeds", "0",
                       "--results", str(res))
    assert code == 0 and "random_micro / digits_collapse: up to date" in err, err
