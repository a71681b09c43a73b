"""What ``prosmin-bench run`` prints (issue 22): a compact table of the run's (model, task) pairs, then where the full
leaderboard is; rendered from constructed records (prosmin_bench/leaderboard/console.py)."""

from __future__ import annotations

import doctest
import re
import statistics

from prosmin_bench.leaderboard import console
from prosmin_bench.results import ErrorRecord, ResultRecord


def _result(model: str, task: str, per_seed: dict[int, dict[str, float]], *, main: str, version: int = 2,
            wall: float = 0.0) -> ResultRecord:
    return ResultRecord(model=model, task=task, task_version=version, task_kind="x", suite="mini", main_score=main,
                        weights_sha256="0" * 64, seeds=sorted(per_seed),
                        per_seed={str(s): m for s, m in per_seed.items()}, wall_time_s=wall)


KNN = {0: {"top1_k20": 0.5, "nll_k20": 2.0, "ece_k20": 0.10, "top1_k10": 0.9},
       1: {"top1_k20": 0.6, "nll_k20": 2.5, "ece_k20": 0.05, "top1_k10": 0.9},
       2: {"top1_k20": 0.4, "nll_k20": 1.5, "ece_k20": 0.15, "top1_k10": 0.9}}


def _rows(text: str) -> list[list[str]]:
    """The table's body rows, split on the column gaps (two spaces or more) of tabulate's "simple" format."""
    lines = text.splitlines()
    header, rule = lines[0], lines[1]
    assert set(rule) <= {"-", " "}
    starts = [m.start() for m in re.finditer(r"-+", rule)]
    body = []
    for line in lines[2:]:
        if not line.strip():
            break
        body.append([line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])])
    assert [header[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] == console.COLUMNS
    return body


def test_one_row_per_pair_in_run_order_with_mean_std_seeds_secondaries_and_provenance():
    knn = _result("dino_micro", "digits_knn", KNN, main="top1_k20", wall=12.34)
    lin = _result("dino_micro", "digits_linear", {0: {"top1": 0.8583, "nll": 0.448, "ece": 0.0361, "lr": 0.1}},
                  main="top1")
    corr = _result("pixels", "digits_c", {0: {"mce": 91.5, "clean_error": 0.05}, 1: {"mce": 93.5, "clean_error": 0.07}},
                   main="mce", version=1, wall=3.0)
    fail = ErrorRecord(model="pixels", task="digits_o", task_version=3, error_type="DataError",
                       message="digits_o: the OOD set is empty; check its folder")
    text = console.run_table([knn, lin, fail, corr], reused={("dino_micro", "digits_linear")})
    rows = _rows(text)
    # mean and sample std over the seeds, computed here with the standard library, in percent for a rate
    top1 = [KNN[s]["top1_k20"] for s in (0, 1, 2)]
    knn_cell = f"{100 * statistics.mean(top1):.2f} ± {100 * statistics.stdev(top1):.2f}"
    assert rows == [
        ["dino_micro", "digits_knn@2", "top1_k20 (%) ↑", knn_cell, "3",
         f"nll_k20 {statistics.mean([2.0, 2.5, 1.5]):.3f}, ece_k20 {100 * statistics.mean([0.10, 0.05, 0.15]):.2f}%",
         "computed (12.3 s)"],
        ["dino_micro", "digits_linear@2", "top1 (%) ↑", "85.83", "1", "nll 0.448, ece 3.61%", "reused"],
        ["pixels", "digits_o@3", "—", "—", "—", "", "failed"],
        # mCE is recorded in percent already, lower is better; its std over two seeds is sqrt(2)
        ["pixels", "digits_c@1", "mce (%) ↓", f"92.50 ± {statistics.stdev([91.5, 93.5]):.2f}", "2",
         "clean_error 6.00%", "computed (3.0 s)"],
    ]
    failed = text[text.index("Failed runs:"):].splitlines()
    assert failed == ["Failed runs:", "  pixels / digits_o: digits_o: the OOD set is empty; check its folder"]
    assert "#" not in text and "|" not in text  # a console table, not the markdown page


def test_no_failed_section_without_failures_and_a_sentence_for_an_empty_run():
    rec = _result("m", "t", {0: {"auroc": 0.75, "fpr95": 0.5}}, main="auroc")
    text = console.run_table([rec])
    assert "Failed runs" not in text
    assert _rows(text) == [["m", "t@2", "auroc (%) ↑", "75.00", "1", "fpr95 50.00%", "computed (0.0 s)"]]
    assert console.run_table([]) == "No (model, task) pair was evaluated.\n"


def test_secondary_metrics_follow_the_main_metrics_variant():
    assert console.secondary_metrics("top1", {"top1", "nll", "ece", "nll_k20"}) == ["nll", "ece"]
    assert console.secondary_metrics("top1_k200", {"nll_k20", "ece_k200"}) == ["ece_k200"]
    assert console.secondary_metrics("auroc", {"fpr95", "sigma_fpr95"}) == ["fpr95"]
    assert console.secondary_metrics("id_top1", {"nll", "ece"}) == []  # "top1" is not its base
    assert console.secondary_metrics("effective_rank", {"nll"}) == []


def test_where_next_names_the_command_and_the_written_pages():
    lines = console.where_next("/data/my results").splitlines()
    assert lines[0] == ("Full leaderboard (every result in /data/my results): prosmin-bench leaderboard --results "
                        "'/data/my results'")  # quoted for the shell
    assert "--out FILE.md" in lines[1] and "--leaderboard FILE.md" in lines[1]
    written = console.where_next("/r", ["/site/mini.md", "/site/imagenet.md"]).splitlines()
    assert written[1] == "Leaderboard written: /site/mini.md, /site/imagenet.md"


def test_module_examples_run():
    result = doctest.testmod(console, report=False)
    assert result.failed == 0 and result.attempted > 0
