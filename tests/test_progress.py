"""The progress policy (prosmin_bench/progress.py, issue 22): who gets a live bar, who gets log lines, who nothing."""

from __future__ import annotations

import doctest
import io
import itertools
import logging
import sys

import pytest

from prosmin_bench import distributed, parallel, progress
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.paths import record_path
from prosmin_bench.results import ErrorRecord, ResultRecord, write_record
from prosmin_bench.reuse import file_stamp, folder_stamps, reused_pairs


@pytest.fixture(autouse=True)
def _policy_restored():
    before = dict(progress._state)
    yield
    progress._state.clear()
    progress._state.update(before)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _expected_style(mode: str, tty: bool, notebook: bool, main: bool, worker: bool) -> str:
    """The module docstring's table, written out case by case."""
    if mode == "off" or not main:
        return "off"  # asked for quiet, or a torchrun rank other than 0
    if worker:
        return "lines"  # --jobs workers never draw live bars
    if mode == "on":
        return "bar"
    return "bar" if tty or notebook else "lines"


@pytest.mark.parametrize("mode, tty, notebook, main, worker",
                         list(itertools.product(progress.MODES, *[(False, True)] * 4)))
def test_style_decides_as_documented(mode, tty, notebook, main, worker):
    got = progress.style(mode, tty=tty, notebook=notebook, main=main, worker=worker)
    assert got == _expected_style(mode, tty, notebook, main, worker)


def test_quiet_and_the_option_resolve_to_a_mode():
    assert progress.resolve(None, quiet=False) == "auto"
    assert progress.resolve(None, quiet=True) == "off"
    assert progress.resolve("on", quiet=True) == "on"  # an explicit --progress wins over -q
    assert progress.resolve("off", quiet=False) == "off"
    with pytest.raises(ProsminBenchError, match="Expected a progress mode in"):
        progress.configure("sometimes")


def test_a_terminal_gets_a_live_bar(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    assert progress.current_style() == "bar"
    assert list(progress.bar(range(3), desc="extract digits", unit="batch", mininterval=0)) == [0, 1, 2]
    drawn = term.getvalue()
    assert "\r" in drawn and "extract digits" in drawn and "3/3" in drawn


def test_without_a_terminal_long_work_logs_lines_and_short_work_nothing(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a SLURM log
    # A CLI run earlier in this process leaves its stderr handler on the package logger; without it, only what
    # tqdm itself writes could reach the stream.
    package = logging.getLogger("prosmin_bench")
    monkeypatch.setattr(package, "handlers", [])
    monkeypatch.setattr(package, "propagate", True)
    monkeypatch.setattr(package, "level", logging.NOTSET)
    assert progress.current_style() == "lines"
    caplog.set_level(logging.INFO, logger="prosmin_bench.progress")
    list(progress.bar(range(5), desc="short work", unit="block"))  # well under LOG_INTERVAL_S
    assert [r for r in caplog.records if r.name == "prosmin_bench.progress"] == []
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)  # every update is "long" now
    with progress.scope("m / t"):
        bar = progress.bar(desc="lr sweep", total=4, unit="head")
    with bar:
        bar.update(3)
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "prosmin_bench.progress"]
    assert lines and all(line.startswith("m / t: lr sweep: ") and "\r" not in line for line in lines)
    assert lines[0].startswith("m / t: lr sweep:   0% 0/4 head [")
    assert "m / t: lr sweep:  75% 3/4 head [" in "\n".join(lines)
    assert lines[-1].startswith("m / t: lr sweep: 100% 4/4 head [")  # the final state
    assert sys.stderr.getvalue() == ""  # the lines go through logging, never raw to the stream


@pytest.mark.parametrize("how", ["quiet", "rank1", "disabled"])
def test_no_progress_when_quiet_on_other_ranks_or_turned_off(how, monkeypatch, caplog):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="prosmin_bench.progress")
    progress.configure(progress.resolve(None, quiet=True) if how == "quiet" else "on")
    if how == "rank1":
        monkeypatch.setattr(distributed, "rank", lambda: 1)  # what torchrun's rank 1 sees
    bar = progress.bar(range(4), desc="k-NN", enabled=False if how == "disabled" else None)
    assert list(bar) == [0, 1, 2, 3] and bar.disable
    assert term.getvalue() == "" and caplog.records == []


def test_a_worker_logs_lines_on_a_terminal_and_leaves_pair_numbers_to_its_parent(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert progress.pair_label(3, 8) == "pair 3/8"
    progress.configure("on", worker=True)
    assert progress.current_style() == "lines" and progress.pair_label(3, 8) == ""
    progress.configure("off", worker=True)
    assert progress.current_style() == "off"


def test_using_restores_the_mode_after_an_error():
    progress.configure("on")
    with pytest.raises(RuntimeError), progress.using("off"):
        assert progress.mode() == "off"
        raise RuntimeError("stop")
    assert progress.mode() == "on"


def _result(model: str, task: str, wall: float) -> ResultRecord:
    return ResultRecord(model=model, task=task, task_version=1, task_kind="knn", suite="mini", main_score="top1",
                        weights_sha256="0" * 64, seeds=[0], per_seed={"0": {"top1": 0.5}}, wall_time_s=wall)


def test_the_jobs_parent_numbers_pairs_as_they_come_back(tmp_path, caplog):
    """``--jobs``: the parent logs "pair i/N done" per record, saying which were reused (file left alone)."""
    res = tmp_path / "res"
    old = _result("m", "kept", 9.0)
    write_record(old, res)
    stamps = [file_stamp(record_path(res, "m", t)) for t in ("kept", "new", "bad")]
    assert stamps[0] is not None and stamps[1:] == [None, None]
    before = folder_stamps(res)  # what the parent takes before handing out the jobs
    new = _result("m", "new", 2.4)
    write_record(new, res)
    bad = ErrorRecord(model="m", task="bad", task_version=1, error_type="DataError", message="no images")
    caplog.set_level(logging.INFO, logger="prosmin_bench.parallel")
    finished = parallel._Finished(total=5, done=2)  # two pairs were current before any worker started
    finished.report([old, new, bad], reused_pairs([old, new, bad], res, before))
    assert [r.getMessage() for r in caplog.records] == [
        "pair 3/5 done: m / kept (up to date)", "pair 4/5 done: m / new (2.4 s)", "pair 5/5 done: m / bad (failed)"]
    write_record(old, res)  # the same record written again is a new file: computed, not reused
    caplog.clear()
    parallel._Finished(total=1, done=0).report([old], reused_pairs([old], res, before))
    assert [r.getMessage() for r in caplog.records] == ["pair 1/1 done: m / kept (9.0 s)"]


def test_module_examples_run():
    result = doctest.testmod(progress, report=False)
    assert result.failed == 0 and result.attempted > 0
