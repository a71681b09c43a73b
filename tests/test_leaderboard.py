"""Leaderboard rendering: a deterministic, pure function of the result files; checked against direct computations."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from prosmin_bench import cards, leaderboard
from prosmin_bench.cli import main
from prosmin_bench.leaderboard.board import collect, mean_ranks, pretraining_overlap
from prosmin_bench.leaderboard.format import MARK_EVAL, MARK_TRAIN, column_unit, fmt_mean_std
from prosmin_bench.leaderboard.pages import HEADER
from prosmin_bench.leaderboard.sections import split_metrics
from prosmin_bench.metrics import metric_info
from prosmin_bench.metrics.info import FRACTION
from prosmin_bench.reported import PAPER_CONSTANTS, reported_scores, to_record_units
from prosmin_bench.results import ErrorRecord, ResultRecord, write_record

REPO = Path(__file__).resolve().parent.parent


def record(model: str, task: str, per_seed: dict[int, dict[str, float]], *, version: int = 1, kind: str = "knn",
           main: str = "top1", suite: str = "mini", pretrained_on: tuple[str, ...] = (),
           datasets: dict | None = None, extras: dict | None = None) -> ResultRecord:
    return ResultRecord(
        model=model, task=task, task_version=version, task_kind=kind, suite=suite, main_score=main,
        weights_sha256="0" * 64, seeds=sorted(per_seed), per_seed={str(s): m for s, m in per_seed.items()},
        datasets=datasets if datasets is not None else {"train": "digits:train", "test": "digits:test"},
        extras=extras or {}, model_info={"method": model.split("_")[0], "pretrained_on": list(pretrained_on)},
        timestamp_utc="2024-01-01T00:00:00Z",
    )


def table_after(text: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table after the line ``heading``, as dicts keyed by header."""
    lines = text.splitlines()
    i = lines.index(heading)
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r)) for r in body]


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """Three models on a k-NN task (higher is better) and a task whose main score is lower-is-better."""
    root = tmp_path / "results"
    rng = np.random.default_rng(0)
    for i, model in enumerate(["dino_micro", "prosmin_micro", "random_micro"]):
        pre = () if model == "random_micro" else ("digits:train",)
        write_record(record(model, "digits_knn", {s: {"top1": 0.5 + 0.1 * i + 0.01 * rng.random(), "nll": 1.0 + s}
                                                  for s in (0, 1, 2)}, pretrained_on=pre), root)
        write_record(record(model, "digits_ece", {s: {"ece": 0.3 - 0.1 * i + 0.01 * s} for s in (0, 1)},
                            kind="linear", main="ece", pretrained_on=pre), root)
    return root


def test_render_is_deterministic_and_independent_of_the_folder_path(results: Path, tmp_path: Path) -> None:
    first = leaderboard.render(results, "mini")
    assert leaderboard.render(results, "mini") == first
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(results, moved)
    for p in sorted(moved.rglob("*.json"), reverse=True):  # other modification order
        p.touch()
    assert leaderboard.render(moved, "mini") == first
    assert str(tmp_path) not in first
    assert first.startswith(HEADER)


def test_summary_has_one_row_per_model_with_mean_and_sample_std(results: Path) -> None:
    text = leaderboard.render(results, "mini")
    rows = table_after(text, "## Summary (measured)")
    assert len(rows) == 3
    for row in rows:
        model = row["model"].split()[0]
        d = json.loads((results / model / "digits_knn.json").read_text())
        values = [d["per_seed"][str(s)]["top1"] for s in (0, 1, 2)]
        expected = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
        assert row["digits_knn@1 top1 (%) ↑"].strip("*") == expected  # the best in bold


def test_rows_are_sorted_by_the_main_score_in_its_direction(results: Path) -> None:
    text = leaderboard.render(results, "mini")
    knn = [r["model"].split()[0] for r in table_after(text, "### digits_knn@1")]
    ece = [r["model"].split()[0] for r in table_after(text, "### digits_ece@1")]
    assert knn == ["random_micro", "prosmin_micro", "dino_micro"]  # top1: higher first
    assert ece == ["random_micro", "prosmin_micro", "dino_micro"]  # ece: lower first (random has 0.1)
    header = next(line for line in text.splitlines() if line.startswith("| model") and "ece" in line)
    assert "ece (%) ↓" in header


def test_mean_rank_matches_scipy_average_ranks(tmp_path: Path) -> None:
    root = tmp_path / "r"
    scores = {"a": (0.9, 0.2), "b": (0.9, 0.1), "c": (0.5, 0.3), "d": (0.7, None)}  # top1 (higher), ece (lower)
    for m, (top1, ece) in scores.items():
        write_record(record(m, "t_knn", {0: {"top1": top1}}), root)
        if ece is not None:
            write_record(record(m, "t_ece", {0: {"ece": ece}}, kind="linear", main="ece"), root)
    board = collect(root)
    ranks = mean_ranks(board.current("mini"))
    r_top1 = dict(zip(scores, rankdata([-v[0] for v in scores.values()], method="average")))
    present = [m for m in scores if scores[m][1] is not None]
    r_ece = dict(zip(present, rankdata([scores[m][1] for m in present], method="average")))
    r_ece["d"] = len(scores)  # a missing result counts as last
    for m in scores:
        assert ranks[m] == pytest.approx((r_top1[m] + r_ece[m]) / 2)
    rows = table_after(leaderboard.render(root, "mini"), "## Summary (measured)")
    assert [r["model"] for r in rows] == sorted(scores, key=lambda m: (ranks[m], m))
    assert rows[-1]["t_ece@1 ece (%) ↓"] == "—"


def test_task_versions_are_never_aggregated_and_old_ones_are_stale(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_record(record("old_model", "digits_knn", {0: {"top1": 0.99}}, version=1), root)
    write_record(record("new_model", "digits_knn", {0: {"top1": 0.40}}, version=2), root)
    text = leaderboard.render(root, "mini")
    rows = table_after(text, "### digits_knn@2")
    assert [r["model"] for r in rows] == ["new_model"]
    assert "99.00" not in text
    assert "- old_model / digits_knn@1 (current: @2); re-run to update" in text
    summary = table_after(text, "## Summary (measured)")
    assert [r["model"] for r in summary] == ["new_model"]


def test_failed_runs_and_unreadable_files_are_listed(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_record(record("good", "digits_knn", {0: {"top1": 0.5}}), root)
    write_record(ErrorRecord(model="broken", task="digits_knn", task_version=1, error_type="WeightsError",
                             message="No weights for 'broken' | try again"), root)
    (root / "junk").mkdir()
    (root / "junk" / "digits_knn.json").write_text("{ truncated")
    (root / "junk" / "other.json").write_text(json.dumps({"hello": 1}))
    text = leaderboard.render(root, "mini")
    assert "- broken / digits_knn@1: WeightsError: No weights for 'broken' \\| try again" in text
    assert "`junk/digits_knn.json`: not valid JSON" in text
    assert "`junk/other.json`: not a prosmin-bench result record" in text
    assert [r["model"] for r in table_after(text, "### digits_knn@1")] == ["good"]
    summary = {r["model"]: r for r in table_after(text, "## Summary (measured)")}
    assert set(summary) == {"good"}


def test_failed_cell_in_summary(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_record(record("a", "t1", {0: {"top1": 0.5}}), root)
    write_record(record("a", "t2", {0: {"top1": 0.6}}), root)
    write_record(record("b", "t1", {0: {"top1": 0.7}}), root)
    write_record(ErrorRecord(model="b", task="t2", task_version=1, error_type="DataError", message="x"), root)
    rows = {r["model"]: r for r in table_after(leaderboard.render(root, "mini"), "## Summary (measured)")}
    assert rows["b"]["t2@1 top1 (%) ↑"] == "failed"


def test_pretrained_on_evaluation_data_is_flagged() -> None:
    test_split = record("m", "t", {0: {"top1": 0.5}}, pretrained_on=("digits:test",))
    train_split = record("m", "t", {0: {"top1": 0.5}}, pretrained_on=("digits:train",))
    whole = record("m", "t", {0: {"top1": 0.5}}, pretrained_on=("digits",))
    other = record("m", "t", {0: {"top1": 0.5}}, pretrained_on=("imagenet:train",))
    ood = record("m", "t", {0: {"auroc": 0.5}}, pretrained_on=("digits_o:test",),
                 datasets={"train": "digits:train", "id": "digits:test", "ood": "digits_o:test"})
    assert pretraining_overlap(test_split) == "eval"
    assert pretraining_overlap(whole) == "eval"
    assert pretraining_overlap(train_split) == "train"
    assert pretraining_overlap(other) == ""
    assert pretraining_overlap(ood) == "eval"


def test_flag_marks_appear_in_tables(results: Path) -> None:
    write_record(record("cheater", "digits_knn", {0: {"top1": 0.95}}, pretrained_on=("digits:test",)), results)
    text = leaderboard.render(results, "mini")
    models = [r["model"] for r in table_after(text, "### digits_knn@1")]
    assert models[0] == f"cheater {MARK_EVAL}"
    assert f"dino_micro {MARK_TRAIN}" in models
    assert "random_micro" in models


def test_units_rates_in_percent_and_raw_otherwise(results: Path) -> None:
    text = leaderboard.render(results, "mini")
    header = next(line for line in text.splitlines() if line.startswith("| model") and "nll" in line)
    assert "top1 (%) ↑" in header and "nll ↓" in header and "nll (%)" not in header
    assert column_unit("top1", [0.5, 1.0]) == "rate"
    assert column_unit("top1", [0.5, 75.0]) == "raw"  # a rate column out of [0, 1] is not scaled
    assert column_unit("mce", [66.1]) == "percent"
    assert fmt_mean_std(0.5, 0.0, 3, "rate") == "50.00 ± 0.00"
    assert fmt_mean_std(0.5, float("nan"), 1, "rate") == "50.00"


def test_per_corruption_metrics_are_folded_one_row_per_metric(tmp_path: Path) -> None:
    root = tmp_path / "r"
    for m, err in (("a", 0.2), ("b", 0.4)):
        write_record(record(m, "digits_c", {0: {"mce": 100 * err, "clean_error": err / 2, "ce_fog": err,
                                                "error_fog_s1": err}}, kind="corruption", main="mce"), root)
    text = leaderboard.render(root, "mini")
    main = table_after(text, "### digits_c@1")
    assert list(main[0]) == ["model", "seeds", "mce (%) ↓", "clean_error (%) ↓"]
    detail = table_after(text, "<details><summary>More metrics (2), one row per metric</summary>")
    assert detail == [{"metric": "ce_fog ↓", "a": "0.200", "b": "0.400"},
                      {"metric": "error_fog_s1 (%) ↓", "a": "20.00", "b": "40.00"}]


def test_wide_tasks_fold_metric_groups() -> None:
    ood = ["auroc", "aupr_in", "aupr_out", "fpr95", "id_top1"] + [f"{p}_{m}" for p in ("energy", "knn", "maxlogit")
                                                                   for m in ("auroc", "aupr_in", "aupr_out", "fpr95")]
    kept, folded = split_metrics(ood)
    assert kept == ["auroc", "aupr_in", "aupr_out", "fpr95", "id_top1"] and len(folded) == 12
    knn = ["top1_k20"] + [f"{m}_k{k}" for m in ("ece", "nll", "top1") for k in (10, 100, 200)] + ["ece_k20", "nll_k20"]
    assert split_metrics(knn) == (knn, [])  # 12 columns: kept whole


def test_write_suite_pages_equal_render_and_link_existing_pngs(tmp_path: Path) -> None:
    root = tmp_path / "r"
    rel = {"confidence": [0.3, 0.7], "accuracy": [0.25, 0.75], "count": [4, 4]}
    for m in ("a_micro", "b_micro"):
        write_record(record(m, "digits_linear", {0: {"top1": 0.5}}, kind="linear", extras={"reliability": rel}),
                     root)
        write_record(record(m, "digits_knn", {0: {"top1_k20": 0.5}}, main="top1_k20",
                            extras={"top1_by_k": {"10": 0.4, "20": 0.5}}), root)
    out = tmp_path / "boards"
    stale_png = out / "figures" / "mini" / "gone_reliability.png"
    stale_png.parent.mkdir(parents=True)
    stale_png.write_bytes(b"old")
    paths = leaderboard.write_suite_pages(root, out)
    assert [p.name for p in paths[:2]] == ["imagenet.md", "mini.md"]
    assert (out / "mini.md").read_text(encoding="utf-8") == leaderboard.render(root, "mini")
    assert (out / "imagenet.md").read_text(encoding="utf-8") == leaderboard.render(root, "imagenet")
    links = [line[line.index("](") + 2:-1] for line in (out / "mini.md").read_text().splitlines()
             if line.startswith("![")]
    assert sorted(links) == ["figures/mini/digits_knn_knn_k.png", "figures/mini/digits_linear_reliability.png"]
    for link in links:
        assert (out / link).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not stale_png.exists()  # figures no page links are removed
    png = (out / links[0]).read_bytes()
    leaderboard.write_suite_pages(root, out)
    assert (out / links[0]).read_bytes() == png


def test_write_single_file(tmp_path: Path, results: Path) -> None:
    out = leaderboard.write(results, tmp_path / "page" / "board.md", suite="mini")
    assert out.read_text(encoding="utf-8") == leaderboard.render(results, "mini")


def test_no_results() -> None:
    text = leaderboard.render(Path("/nonexistent/results"))
    assert "No result files found" in text


# ------------------------------------------------------------------------------------------ reported numbers
def test_reported_numbers_sit_in_their_own_table(tmp_path: Path) -> None:
    card_dir = tmp_path / "cards"
    card_dir.mkdir()
    (card_dir / "toy.toml").write_text(
        'name = "toy_micro"\narch = "vit_micro"\nscale = "mini"\nmethod = "toy"\n'
        'paper = "Doe et al. 2030"\n[weights]\nrandom = true\n'
        '[[reported.digits_knn]]\ntop1 = 87.5\nunit = "percent"\nepochs = 100\nsource = "Doe et al. 2030, Table 9"\n'
    )
    cards.add_card_dir(card_dir)
    root = tmp_path / "r"
    write_record(record("toy_micro", "digits_knn", {0: {"top1": 0.25}}), root)
    text = leaderboard.render(root, "mini")
    measured = table_after(text, "### digits_knn@1")
    assert [r["top1 (%) ↑"] for r in measured] == ["**25.00**"]  # the only (so best) model, in bold
    reported = table_after(text, "## Reported in papers (not measured here)")
    assert reported == [{"model (reported)": "toy_micro", "epochs": "100", "note": "—",
                         "digits_knn top1 (%) ↑": "87.50 [1]"}]
    assert "1. Doe et al. 2030, Table 9" in text
    summary = table_after(text, "## Summary (measured)")
    assert "87.50" not in json.dumps(summary)


def test_cards_agree_with_the_protocols_constants() -> None:
    """Two transcriptions of the papers' tables (docs/protocols.md constants, baselines/ cards) must agree."""
    from prosmin_bench.models.zoo import catalogue

    carded = [s for _, s in catalogue().items() if s.reported]
    assert carded, "no baselines/ card reports numbers: the reported-numbers tables would be empty"
    from prosmin_bench.reported import _card_entries

    card_rows = [r for s in carded for r in _card_entries(s)]
    names = {s.name for s in carded}
    for c in PAPER_CONSTANTS:
        if c.model not in names:
            continue
        same = [r for r in card_rows if (r.model, r.task, r.metric) == (c.model, c.task, c.metric)]
        assert any(r.value == pytest.approx(c.value, abs=1e-9) for r in same), (
            f"{c.model} {c.task} {c.metric} = {c.value} ({c.source}) is not in the card: {[r.value for r in same]}")


def test_reported_scores_prefer_cards_and_convert_units() -> None:
    rows = reported_scores("imagenet")
    assert rows == sorted(rows, key=lambda r: (r.task, r.metric, r.model, r.source, r.epochs or 0, r.note, r.value))
    assert all(0 <= r.value <= 1 for r in rows if metric_info(r.metric).unit == FRACTION)
    assert to_record_units("top1", 77.0) == pytest.approx(0.77)
    assert to_record_units("ece", 0.015) == pytest.approx(0.015)
    assert to_record_units("mce", 66.1) == pytest.approx(66.1)
    # ProSMin's own numbers are reported (no weights were ever released, so only the paper's numbers exist).
    prosmin = {(r.task, r.metric, r.epochs): r.value for r in rows if r.model == "prosmin_vits16"}
    assert prosmin[("imagenet_linear", "top1", 800)] == pytest.approx(0.784)
    assert prosmin[("imagenet_c", "mce", 800)] == pytest.approx(65.8)


def test_imagenet_page_without_results_shows_reported_numbers(tmp_path: Path) -> None:
    text = leaderboard.render(tmp_path / "none", "imagenet")
    assert "No measured results for this suite yet" in text
    rows = table_after(text, "## Reported in papers (not measured here)")
    cells = {(r["model (reported)"], r["epochs"]): r for r in rows}
    assert "78.40" in cells[("prosmin_vits16", "800")]["imagenet_linear top1 (%) ↑"]


# ------------------------------------------------------------------------------------------ committed board
def test_committed_mini_leaderboard_is_reproduced_byte_for_byte() -> None:
    page, results = REPO / "leaderboards" / "mini.md", REPO / "leaderboards" / "results"
    assert page.is_file() and any(results.glob("*/*.json")), (
        "leaderboards/mini.md and leaderboards/results/ must be committed "
        "(`prosmin-bench run --results leaderboards/results --leaderboard leaderboards`)")
    assert leaderboard.render(results, "mini") == page.read_text(encoding="utf-8"), (
        "leaderboards/mini.md differs from the result files: regenerate it with "
        "`prosmin-bench leaderboard --results leaderboards/results --out leaderboards`")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` with its size and modification time (what a write into it would change)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_cli_writes_the_committed_pages_byte_for_byte_without_touching_the_checkout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`prosmin-bench leaderboard --results leaderboards/results --out DIR` reproduces the committed mini.md and
    imagenet.md exactly (and the same figure files), writing only into DIR."""
    from prosmin_bench.plots import drawing

    def draw(spec, records, path, colors=None):  # what is drawn is tests/test_plots.py's; here only where
        assert {r.model for r in records} >= set(spec.models)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(spec.title.encode())
        return Path(path)

    # Drawing the 11 committed figures takes most of a minute on two busy cores.
    monkeypatch.setattr(drawing, "draw", draw)
    committed = REPO / "leaderboards"
    before = _tree(committed)
    out = tmp_path / "boards"
    code = main(["leaderboard", "--results", str(committed / "results"), "--out", str(out)])
    printed, err = capsys.readouterr()
    assert code == 0, err
    for page in ("mini.md", "imagenet.md"):
        assert (out / page).read_bytes() == (committed / page).read_bytes(), (
            f"leaderboards/{page} differs from what the result files render: regenerate it with "
            "`prosmin-bench leaderboard --results leaderboards/results --out leaderboards`")
    figures = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert figures == sorted(p.relative_to(committed).as_posix() for p in (committed / "figures").rglob("*.png"))
    assert sorted(printed.split()) == sorted(str(p) for p in [out / "imagenet.md", out / "mini.md"]
                                             + [out / f for f in figures])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left behind
    assert _tree(committed) == before


# ------------------------------------------------------------------ issue 19: deviations, protocol variants, variants
def _task_card(folder: Path, name: str, top: str = "", tail: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\nkind = "linear"\nversion = 1\nsuite = "mini"\nmain_score = "top1"\n{top}\n'
        '[datasets]\ntrain = "digits:train"\ntest = "digits:test"\n' + tail)


DEVIATION = ('\n[[deviations]]\nfield = "training views"\npaper = "RandomResizedCrop + flip (eval_linear.py:85-90)"\n'
             'ours = "cached centre-crop features"\nwhy = "extracted once"\n')


def test_tasks_with_deviations_are_marked_and_list_them(tmp_path: Path) -> None:
    from prosmin_bench.leaderboard.format import MARK_DEVIATES

    _task_card(tmp_path / "cards", "lb_dev", tail=DEVIATION)
    _task_card(tmp_path / "cards", "lb_exact", "deviations = []")
    cards.add_card_dir(tmp_path / "cards")
    root = tmp_path / "results"
    for task in ("lb_dev", "lb_exact"):
        for i, model in enumerate(["dino_micro", "prosmin_micro"]):
            write_record(record(model, task, {0: {"top1": 0.5 + 0.1 * i}}, kind="linear"), root)
    text = leaderboard.render(root, "mini")
    lines = text.splitlines()
    assert f"### lb_dev@1 {MARK_DEVIATES}" in lines and "### lb_exact@1" in lines
    assert not any(line.startswith("### lb_exact") and MARK_DEVIATES in line for line in lines)
    assert ("- `training views`: here cached centre-crop features. Paper: RandomResizedCrop + flip "
            "(eval_linear.py:85-90). Why: extracted once.") in lines
    summary = table_after(text, "## Summary (measured)")
    assert f"lb_dev@1 {MARK_DEVIATES} top1 (%) ↑" in summary[0] and "lb_exact@1 top1 (%) ↑" in summary[0]
    assert MARK_DEVIATES in leaderboard.render(root, "mini").split("## Summary")[0]  # the legend explains it
    assert leaderboard.render(root, "mini") == text


def test_variant_gap_equals_the_difference_of_the_seed_means(tmp_path: Path) -> None:
    _task_card(tmp_path / "cards", "lb_base")
    _task_card(tmp_path / "cards", "lb_aug", 'variant_of = "lb_base"')
    cards.add_card_dir(tmp_path / "cards")
    root = tmp_path / "results"
    rng = np.random.default_rng(3)
    values = {(t, m): rng.uniform(0.3, 0.9, size=3) for t in ("lb_base", "lb_aug")
              for m in ("dino_micro", "ibot_micro", "prosmin_micro")}
    values.pop(("lb_aug", "ibot_micro"))  # a model with one record only is left out
    for (task, model), v in values.items():
        write_record(record(model, task, {s: {"top1": float(x)} for s, x in enumerate(v)}, kind="linear"), root)
    gaps = {m: 100 * (float(np.mean(values[("lb_aug", m)])) - float(np.mean(values[("lb_base", m)])))
            for m in ("dino_micro", "prosmin_micro")}
    text = leaderboard.render(root, "mini")
    (line,) = [x for x in text.splitlines() if x.startswith("Protocol variant of `lb_base`")]
    assert (f"lb_aug@1 − lb_base@1, `top1` (points)" in line
            and f"dino_micro {gaps['dino_micro']:+.2f}, prosmin_micro {gaps['prosmin_micro']:+.2f};" in line
            and f"mean over 2 ranked models {statistics.mean(gaps.values()):+.2f}." in line)
    assert "ibot_micro" not in line
    section = text.split("### lb_aug@1")[1].split("###")[0]
    assert line in section  # in the variant's own section
    # a reference row is listed but not averaged: the mean stays over the ranked models
    for task in ("lb_base", "lb_aug"):
        rec = record("pixels", task, {0: {"top1": 0.99 if task == "lb_aug" else 0.01}}, kind="linear")
        rec.model_info["reference"] = True
        write_record(rec, root)
    (line,) = [x for x in leaderboard.render(root, "mini").splitlines() if x.startswith("Protocol variant of")]
    assert "pixels +98.00 (not averaged)" in line
    assert f"mean over 2 ranked models {statistics.mean(gaps.values()):+.2f}." in line


def test_variant_models_are_listed_beside_their_model_but_never_ranked(tmp_path: Path) -> None:
    from prosmin_bench.leaderboard.board import sorted_by_main

    root = tmp_path / "results"
    scores = {"dino_micro": 0.60, "prosmin_micro": 0.50, "prosmin_target_micro": 0.90, "random_micro": 0.20}
    for task in ("digits_knn", "digits_linear"):
        for model, v in scores.items():
            rec = record(model, task, {0: {"top1": v}, 1: {"top1": v + 0.01}}, kind=task.split("_")[1])
            if model == "prosmin_target_micro":
                rec.model_info.update({"variant_of": "prosmin_micro", "network": "target", "method": "prosmin"})
            write_record(rec, root)
    board = collect(root)
    current = board.current("mini")
    ranks = mean_ranks(current)
    assert set(ranks) == {"dino_micro", "prosmin_micro", "random_micro"}
    assert ranks == {"dino_micro": 1.0, "prosmin_micro": 2.0, "random_micro": 3.0}  # as if the variant were absent
    order = [r.model for r in sorted_by_main(current["digits_knn"], "top1")]
    assert order == ["dino_micro", "prosmin_micro", "prosmin_target_micro", "random_micro"]
    text = leaderboard.render(root, "mini")
    summary = table_after(text, "## Summary (measured)")
    assert [r["model"] for r in summary] == ["dino_micro", "prosmin_micro",
                                             "prosmin_target_micro (variant of prosmin_micro, target network)",
                                             "random_micro"]
    by_model = {r["model"]: r for r in summary}
    variant = by_model["prosmin_target_micro (variant of prosmin_micro, target network)"]
    assert variant["mean rank ↓"] == "—" and "**" not in variant["digits_knn@1 top1 (%) ↑"]
    assert by_model["dino_micro"]["digits_knn@1 top1 (%) ↑"].startswith("**")  # the best learned model, not the variant


def test_imagenet_c_section_reads_the_papers_mce_as_corruption_error(tmp_path: Path) -> None:
    text = leaderboard.render(tmp_path / "none", "imagenet")
    section = text.split("### imagenet_c")[1].split("\n## ")[0]
    assert "mean calibration error" in section and "mean corruption error" in section
    assert "lower is better" in section
    assert section.splitlines()[0].endswith("¶")  # the head of imagenet_linear (cached features) differs
