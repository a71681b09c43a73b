"""The Python API: evaluate -> result files -> load_results (one row per model, task, metric, seed); the README's
generated blocks and runnable examples."""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import pytest

import prosmin_bench
from prosmin_bench import leaderboard, readme_tables
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.results import ErrorRecord, ResultRecord, write_record

REPO = Path(__file__).resolve().parent.parent


def _record(model: str, task: str, version: int, per_seed: dict[int, dict[str, float]], main: str) -> ResultRecord:
    return ResultRecord(model=model, task=task, task_version=version, task_kind="knn", suite="mini", main_score=main,
                        weights_sha256=model[0] * 64, seeds=sorted(per_seed),
                        per_seed={str(s): m for s, m in per_seed.items()})


def _rows_from_json(root: Path) -> set[tuple]:
    """The expected rows, read with the json module directly (not through prosmin_bench's reader)."""
    rows = set()
    for path in sorted(root.glob("*/*.json")):
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if d.get("record_type") != "result":
            continue
        for seed in d["seeds"]:
            for metric, value in d["per_seed"][str(seed)].items():
                rows.add((d["model"], d["task"], d["task_version"], metric, seed, value, metric == d["main_score"]))
    return rows


def test_load_results_one_row_per_model_task_metric_seed(tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_record(_record("alpha", "t_knn", 2, {0: {"top1": 0.5, "nll": 1.5}, 1: {"top1": 0.6, "nll": 1.2}}, "top1"),
                 root)
    write_record(_record("beta", "t_knn", 1, {0: {"top1": 0.9, "nll": 0.3}}, "top1"), root)
    write_record(_record("alpha", "t_ece", 1, {0: {"ece": 0.1}, 1: {"ece": 0.2}, 2: {"ece": 0.3}}, "ece"), root)
    write_record(ErrorRecord(model="gamma", task="t_knn", task_version=2, error_type="DataError", message="x"), root)
    (root / "junk").mkdir()
    (root / "junk" / "t.json").write_text("{")
    df = prosmin_bench.load_results(root)
    assert list(df.columns) == ["model", "task", "task_version", "task_kind", "suite", "metric", "seed", "value",
                                "main_score", "current", "weights_sha256"]
    got = set(zip(df.model, df.task, df.task_version, df.metric, df.seed, df.value, df.main_score))
    assert got == _rows_from_json(root)
    assert len(df) == len(got) == 2 * 2 + 2 + 3
    assert not df.duplicated(["model", "task", "metric", "seed"]).any()
    # beta's t_knn is of an older version than alpha's: flagged, never to be averaged with it.
    assert set(df[~df.current].model) == {"beta"}
    assert df.equals(df.sort_values(["model", "task", "metric", "seed"]).reset_index(drop=True))
    assert prosmin_bench.load_results(tmp_path / "empty").empty


def test_evaluate_then_load_results_and_render(tmp_path: Path) -> None:
    results = tmp_path / "results"
    records = prosmin_bench.evaluate("random_micro", "digits_knn", seeds=(0, 1), device="cpu", results_dir=results)
    (rec,) = records
    assert isinstance(rec, ResultRecord) and rec.seeds == [0, 1]
    path = results / "random_micro" / "digits_knn.json"
    stamp = json.loads(path.read_text())["timestamp_utc"]
    df = prosmin_bench.load_results(results)
    metrics = prosmin_bench.get_task("digits_knn").protocol["ks"]
    assert len(df) == 6 * len(metrics) * 2  # top1, nll, ece, nll_ts, ece_ts, temperature per k; two seeds
    assert set(zip(df.model, df.task, df.task_version, df.metric, df.seed, df.value, df.main_score)) == \
        _rows_from_json(results)
    main = df[df.main_score]
    assert set(main.metric) == {"top1_k20"} and list(main.seed) == [0, 1]
    # A second call finds the record up to date and does not recompute it.
    again = prosmin_bench.evaluate("random_micro", "digits_knn", seeds=(0, 1), device="cpu", results_dir=results)
    assert again[0].timestamp_utc == stamp == json.loads(path.read_text())["timestamp_utc"]
    text = leaderboard.render(results, "mini")
    assert text == leaderboard.render(results, "mini") and "### digits_knn@2" in text


# ------------------------------------------------------------------------------------------ docs and README
DOC_FILES = [REPO / "docs" / "metrics.md", REPO / "README.md"]


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_markdown_examples_run(path: Path) -> None:
    assert path.is_file() and ">>>" in path.read_text(encoding="utf-8"), f"{path.name} lost its runnable examples"
    result = doctest.testfile(str(path), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.parametrize("name", readme_tables.DEFAULT_FILES)
def test_generated_blocks_are_current(name: str) -> None:
    path = REPO / name
    assert "<!-- BEGIN GENERATED:" in path.read_text(encoding="utf-8"), f"{name} lost its generated blocks"
    stale = readme_tables.stale_blocks(path, REPO / "leaderboards" / "results")
    assert not stale, f"{name} blocks {stale} are out of date: run `python -m prosmin_bench.readme_tables`"


def test_readme_tables_list_every_registered_task_and_model() -> None:
    tasks = readme_tables.tasks_table().splitlines()
    for name in prosmin_bench.list_tasks():
        spec = prosmin_bench.get_task(name)
        (row,) = [r for r in tasks if r.startswith(f"| `{name}` ")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [spec.suite, spec.kind, str(spec.version)]
        assert cells[4].startswith(f"`{spec.main_score}`")
    models = readme_tables.models_table()
    for name in prosmin_bench.list_models():
        assert f"| `{name}` " in models
    # The full tables (docs/catalogue.md) carry each card's description; the README's compact ones do not.
    full_tasks, full_models = readme_tables.tasks_table(full=True), readme_tables.models_table(full=True)
    for name in prosmin_bench.list_tasks():
        assert prosmin_bench.get_task(name).description in full_tasks
        assert prosmin_bench.get_task(name).description not in readme_tables.tasks_table()
    assert "| description" in full_models.splitlines()[0] and "description" not in models.splitlines()[0]


def test_update_text_replaces_only_the_blocks() -> None:
    text = ("intro\n<!-- BEGIN GENERATED: tasks -->\nold table\n<!-- END GENERATED: tasks -->\nmiddle\n"
            "<!-- BEGIN GENERATED: models -->\n<!-- END GENERATED: models -->\nend\n")
    blocks = {"tasks": lambda: "T", "models": lambda: "M"}
    out = readme_tables.update_text(text, blocks)
    assert out == ("intro\n<!-- BEGIN GENERATED: tasks -->\n<!-- generated by prosmin_bench.readme_tables; do not "
                   "edit -->\nT\n<!-- END GENERATED: tasks -->\nmiddle\n<!-- BEGIN GENERATED: models -->\n"
                   "<!-- generated by prosmin_bench.readme_tables; do not edit -->\nM\n"
                   "<!-- END GENERATED: models -->\nend\n")
    assert readme_tables.update_text(out, blocks) == out
    with pytest.raises(ProsminBenchError, match="not closed"):
        readme_tables.update_text("<!-- BEGIN GENERATED: tasks -->\n", blocks)
    with pytest.raises(ProsminBenchError, match="unknown generated block"):
        readme_tables.update_text("<!-- BEGIN GENERATED: x -->\n<!-- END GENERATED: x -->\n", blocks)


def test_update_readme_file(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# t\n<!-- BEGIN GENERATED: leaderboard-mini -->\n<!-- END GENERATED: leaderboard-mini -->\n")
    results = tmp_path / "results"
    write_record(_record("alpha", "t_knn", 1, {0: {"top1": 0.5}}, "top1"), results)
    assert readme_tables.stale_blocks(readme, results) == ["leaderboard-mini"]
    assert readme_tables.update_readme(readme, results) is True
    assert readme_tables.stale_blocks(readme, results) == []
    assert readme_tables.update_readme(readme, results) is False
    assert "| alpha " in readme.read_text() and "[leaderboards/mini.md](leaderboards/mini.md)" in readme.read_text()


@pytest.mark.parametrize("module", ["prosmin_bench.api", "prosmin_bench.leaderboard", "prosmin_bench.reported",
                                    "prosmin_bench.plots"])
def test_docstring_examples_run(module: str) -> None:
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0 and result.attempted > 0


def test_load_results_reads_the_folder_run_writes_to_by_default(_isolated_home):
    """`run` writes to $PROSMIN_BENCH_HOME/results by default, so that is where load_results() looks."""
    rec = ResultRecord(model="random_micro", task="digits_knn", task_version=1, task_kind="knn", suite="mini",
                       main_score="top1_k20", weights_sha256="0" * 64, seeds=[0], per_seed={"0": {"top1_k20": 0.25}})
    write_record(rec, _isolated_home / "results")
    df = prosmin_bench.load_results()
    assert df[["model", "task", "metric", "value"]].values.tolist() == [["random_micro", "digits_knn", "top1_k20", 0.25]]
