"""``prosmin-bench run`` end to end (issue 22): the compact table on stdout, progress on a stderr that is not a
terminal (pair lines, extraction bars as log lines), and none of it with ``-q``."""

from __future__ import annotations

import re

from prosmin_bench import progress
from prosmin_bench.cli import main

RUN = ["run", "--model", "random_micro", "--task", "digits_knn,digits_linear", "--seeds", "0", "--jobs", "1"]


def _rows(out: str) -> list[str]:
    return [line.rstrip() for line in out.splitlines() if line.startswith("random_micro ")]


def test_run_prints_its_pairs_and_progress_and_q_silences_the_progress(tmp_path, capsys, monkeypatch):
    res = tmp_path / "res"
    # Every bar update is logged (the real interval, 30 s, is longer than this whole run).
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    assert main([*RUN, "--results", str(res)]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[:2] for line in _rows(out)] == [["random_micro", "digits_knn@2"], ["random_micro", "digits_linear@2"]]
    assert all(re.search(r"  computed \(\d+\.\d s\)$", line) for line in _rows(out)), out
    assert "# prosmin-bench leaderboard" not in out and "Failed runs" not in out  # not the markdown page
    assert f"prosmin-bench leaderboard --results {res}" in out
    assert "pair 1/2: random_micro / digits_knn: running" in err
    assert "pair 2/2 done: random_micro / digits_linear: top1 = " in err
    # the extraction bar of the first pair, as log lines (stderr here is not a terminal)
    assert "INFO prosmin_bench.progress: random_micro / digits_knn: random_micro digits@1:train: 100% " in err
    assert "random_micro / digits_linear: linear probe lr sweep on digits:train (seed 0): 100% " in err
    assert "\r" not in err  # lines, not carriage returns

    assert main([*RUN, "--results", str(res)]) == 0  # everything current: both reused
    out, err = capsys.readouterr()
    assert [line.split()[-1] for line in _rows(out)] == ["reused"] * 2
    assert "pair 2/2: random_micro / digits_linear: up to date" in err and "prosmin_bench.progress" not in err

    assert main(["-q", *RUN, "--results", str(tmp_path / "res2")]) == 0  # computed again (cached features), quietly
    out, err = capsys.readouterr()
    assert err == ""
    assert len(_rows(out)) == 2 and all(re.search(r"  computed \(\d+\.\d s\)$", line) for line in _rows(out))
