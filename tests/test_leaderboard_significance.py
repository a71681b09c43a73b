"""The leaderboard's intervals and marks (issue 17): 95% CIs, paired significance against the best model, reference
rows and unranked tasks out of the mean rank, the grid-edge flag, and the mini page's opening sentences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from prosmin_bench import leaderboard
from prosmin_bench.leaderboard.board import collect, mean_ranks
from prosmin_bench.leaderboard.format import MARK_EDGE, MARK_SAME
from prosmin_bench.metrics import ScoreSamples
from prosmin_bench.record_samples import encode
from prosmin_bench.results import ResultRecord, write_record
from test_leaderboard import table_after

N = 400  # test images
DATA = {"hash": "stat", "sets": {"digits:test": {"ref": "digits:test", "fingerprint": "f-test"},
                                 "digits:train": {"ref": "digits:train", "fingerprint": "f-train"}}}


def correct(rate: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(N) < rate).astype(float)


def rec(model: str, task: str, per_seed_values: list[np.ndarray] | None = None, *, main: str = "top1",
        kind: str = "knn", ranked: bool | None = True, reference: bool = False, means: list[float] | None = None,
        data: dict | None = None, extras: dict | None = None) -> ResultRecord:
    """A record whose main score per seed is the mean of ``per_seed_values`` (stored as its samples), or
    ``means`` for a record without per-image values (made before they were recorded)."""
    seeds = list(range(len(per_seed_values or means or [])))
    values = [float(v.mean()) for v in per_seed_values] if per_seed_values is not None else means
    stored = encode(ScoreSamples.mean(main, np.stack(per_seed_values)), seeds) if per_seed_values is not None else {}
    return ResultRecord(
        model=model, task=task, task_version=1, task_kind=kind, suite="mini", main_score=main,
        weights_sha256="0" * 64, seeds=seeds, per_seed={str(s): {main: v} for s, v in zip(seeds, values)},
        datasets={"train": "digits:train", "test": "digits:test"}, data=DATA if data is None else data,
        extras=extras or {}, ranked=ranked, samples=stored,
        ci95={main: [min(values) - 0.01, max(values) + 0.01]} if per_seed_values is not None else {},
        model_info={"method": "reference" if reference else model.split("_")[0], "reference": reference},
        timestamp_utc="2024-01-01T00:00:00Z",
    )


def summary_row(text: str, model: str) -> dict[str, str]:
    rows = table_after(text, "## Summary (measured)")
    return next(r for r in rows if r["model"].split(" ")[0] == model)


@pytest.fixture
def board_dir(tmp_path: Path) -> Path:
    """best (80%) on two tasks; close: two images apart; weak: 15 points below by construction; other_data: close
    to best but evaluated on another test set; pixels: a reference that beats them all."""
    root = tmp_path / "results"
    best = [correct(0.8, 1), correct(0.8, 2)]
    close = [v.copy() for v in best]
    for v in close:
        v[np.flatnonzero(v)[:2]] = 0.0
    weak = []
    for i, v in enumerate(best):
        w = v.copy()
        w[np.random.default_rng(10 + i).choice(np.flatnonzero(v), int(0.15 * N), replace=False)] = 0.0
        weak.append(w)
    other = {"hash": "stat", "sets": {"digits:test": {"ref": "digits:test", "fingerprint": "another"}}}
    for task in ("digits_knn", "digits_other"):
        write_record(rec("best_micro", task, best), root)
        write_record(rec("close_micro", task, close), root)
        write_record(rec("weak_micro", task, weak), root)
        write_record(rec("otherdata_micro", task, close, data=other), root)
        write_record(rec("pixels", task, [np.ones(N), np.ones(N)], reference=True), root)
    return root


def test_paired_marks_follow_the_construction(board_dir: Path) -> None:
    text = leaderboard.render(board_dir, "mini")
    task = table_after(text, "### digits_knn@1")
    cells = {r["model"]: r["top1_k20 (%) ↑" if "top1_k20 (%) ↑" in r else "top1 (%) ↑"] for r in task}
    assert cells["best_micro"].startswith("**") and MARK_SAME not in cells["best_micro"]
    assert cells["close_micro"].endswith(MARK_SAME)  # two images apart: the interval holds 0
    assert not cells["weak_micro"].endswith(MARK_SAME) and not cells["weak_micro"].startswith("**")  # 15 points
    assert not cells["otherdata_micro"].endswith(MARK_SAME)  # other test data: never compared
    assert "Not compared with the best for significance: otherdata_micro (it was not evaluated on the same test " \
           "data as best_micro)." in text
    assert cells["pixels (reference)"] == "100.00 ± 0.00"  # the best score, but a reference: not bold, not tested
    assert summary_row(text, "close_micro")["digits_knn@1 top1 (%) ↑"].endswith(MARK_SAME)
    assert summary_row(text, "best_micro")["digits_knn@1 top1 (%) ↑"].startswith("**")
    assert leaderboard.render(board_dir, "mini") == text  # the bootstrap is seeded: byte for byte


def test_the_ci_column_shows_the_recorded_interval(board_dir: Path) -> None:
    text = leaderboard.render(board_dir, "mini")
    rows = {r["model"]: r for r in table_after(text, "### digits_knn@1")}
    ci = collect(board_dir).current("mini")["digits_knn"]
    best = next(r for r in ci if r.model == "best_micro").ci95["top1"]
    assert rows["best_micro"]["top1 95% CI (%)"] == f"[{100 * best[0]:.2f}, {100 * best[1]:.2f}]"
    assert list(rows)[-1] == "pixels (reference)"  # references under the learned models


def test_references_stay_out_of_the_ranking(board_dir: Path) -> None:
    current = collect(board_dir).current("mini")
    ranks = mean_ranks(current)
    assert "pixels" not in ranks
    learned = {t: [r for r in rs if r.model != "pixels"] for t, rs in current.items()}
    for m, v in ranks.items():  # scipy's average ranks over the learned models only
        per_task = [rankdata([-r.mean["top1"] for r in rs])[[r.model for r in rs].index(m)] for rs in learned.values()]
        assert v == pytest.approx(np.mean(per_task))
    text = leaderboard.render(board_dir, "mini")
    row = summary_row(text, "pixels")
    assert row["model"] == "pixels (reference)" and row["mean rank ↓"] == "—" and row["method"] == "reference"
    assert [r["model"].split(" ")[0] for r in table_after(text, "## Summary (measured)")][-1] == "pixels"


def test_unranked_tasks_count_in_no_mean_rank_and_get_no_marks(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for i, m in enumerate(["a_micro", "b_micro", "c_micro"]):
        write_record(rec(m, "digits_knn", [correct(0.5 + 0.1 * i, i)]), root)
        # the diagnostic ranks the models the other way round
        write_record(rec(m, "digits_collapse", means=[10.0 - i], main="effective_rank", kind="collapse",
                         ranked=False), root)
    current = collect(root).current("mini")
    assert mean_ranks(current) == {"a_micro": 3.0, "b_micro": 2.0, "c_micro": 1.0}
    text = leaderboard.render(root, "mini")
    header = "digits_collapse@1 effective_rank ↑ (not ranked)"
    assert summary_row(text, "a_micro")[header] == "10.000"  # best of the diagnostic, but no bold: not ranked
    assert "(not ranked): a diagnostic task" in text


def test_an_old_record_without_ranked_takes_the_cards_value(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for i, m in enumerate(["a_micro", "b_micro"]):
        write_record(rec(m, "digits_knn", means=[0.5 + 0.1 * i], ranked=None), root)
        write_record(rec(m, "digits_collapse", means=[10.0 - i], main="effective_rank", kind="collapse",
                         ranked=None), root)  # the shipped card says ranked = false
    assert mean_ranks(collect(root).current("mini")) == {"a_micro": 2.0, "b_micro": 1.0}


def test_a_choice_on_the_grid_edge_is_flagged(tmp_path: Path) -> None:
    root = tmp_path / "results"
    edge = {"selection": {"lr": {"grid": [0.1, 1.0], "chosen": [0.1, 1.0], "edge": [False, True]}}}
    inside = {"selection": {"lr": {"grid": [0.1, 0.3, 1.0], "chosen": [0.3, 0.3], "edge": [False, False]}}}
    write_record(rec("a_micro", "digits_linear", means=[0.5, 0.6], kind="linear", extras=edge), root)
    write_record(rec("b_micro", "digits_linear", means=[0.4, 0.5], kind="linear", extras=inside), root)
    models = [r["model"] for r in table_after(leaderboard.render(root, "mini"), "### digits_linear@1")]
    assert models == [f"a_micro {MARK_EDGE}", "b_micro"]


def test_old_records_without_intervals_render_without_them(tmp_path: Path) -> None:
    root = tmp_path / "results"
    for i, m in enumerate(["a_micro", "b_micro"]):
        write_record(rec(m, "digits_knn", means=[0.5 + 0.1 * i, 0.52 + 0.1 * i]), root)
    text = leaderboard.render(root, "mini")
    rows = table_after(text, "### digits_knn@1")
    assert "top1 95% CI (%)" not in rows[0] and rows[0]["top1 (%) ↑"] == "**61.00 ± 1.41**"
    assert rows[1]["top1 (%) ↑"] == "51.00 ± 1.41"
    assert "No significance test: no per-image values in the records" in text


def test_the_mini_page_opens_with_what_it_is_and_where_pixels_sits(board_dir: Path, tmp_path: Path) -> None:
    text = leaderboard.render(board_dir, "mini")
    opening = text.splitlines()[3]
    assert opening.startswith("The mini suite is a 32-px, 1.4k-image smoke test of every protocol and method")
    assert "not how the methods rank on ImageNet" in opening
    best = 100 * np.mean([correct(0.8, 1).mean(), correct(0.8, 2).mean()])
    assert ("The `pixels` reference (the raw normalised pixels as features, nothing learned) scores 100.00% on "
            f"digits_knn (`top1`), against {best:.2f}% for the best learned model, best_micro.") in opening
    root = tmp_path / "nopixels"
    write_record(rec("a_micro", "digits_knn", means=[0.5]), root)
    opening = leaderboard.render(root, "mini").splitlines()[3]
    assert opening.startswith("The mini suite is") and "pixels" not in opening
