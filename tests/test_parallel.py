"""``--jobs``: models evaluated in worker processes give the serial run's records (prosmin_bench/parallel.py)."""

import json

import pytest

from prosmin_bench import parallel, threads
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.models import get_model_spec
from prosmin_bench.runner import RunOptions, evaluate
from prosmin_bench.tasks import get_task_spec


def _records(folder):
    return {p.parent.name + "/" + p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*/*.json"))}


def test_jobs_give_the_serial_numbers(tmp_path, monkeypatch):
    models, tasks = ["random_micro", "pixels"], ["digits_knn"]
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "home_parallel"))
    out = evaluate(models, tasks, options=RunOptions(seeds=(0,), jobs=2, results_dir=tmp_path / "parallel"))
    # A re-run with every record current starts no worker: the records are checked in this process.
    monkeypatch.setattr(parallel.cf, "ProcessPoolExecutor", lambda *a, **k: pytest.fail("started workers"))
    again = evaluate(models, tasks, options=RunOptions(seeds=(0,), jobs=2, results_dir=tmp_path / "parallel"))
    on_disk = _records(tmp_path / "parallel")
    assert [r.to_dict() for r in again] == [on_disk[f"{m}/digits_knn"] for m in models]  # reused, not recomputed
    monkeypatch.undo()
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "home_serial"))  # nothing cached shared between the two
    evaluate(models, tasks, options=RunOptions(seeds=(0,), jobs=1, results_dir=tmp_path / "serial"))
    par, ser = _records(tmp_path / "parallel"), _records(tmp_path / "serial")
    assert sorted(par) == sorted(ser) == ["pixels/digits_knn", "random_micro/digits_knn"]
    assert [r.model for r in out] == models  # the serial order, whichever job finished first
    for key in par:
        assert par[key]["record_type"] == "result"
        assert par[key]["per_seed"] == ser[key]["per_seed"]
        assert par[key]["weights_sha256"] == ser[key]["weights_sha256"]
        execution = par[key]["execution"]
        assert execution["jobs"] == 2
        assert execution["intra_op_threads"] == threads.resolve_threads(None, 2)[0]


def test_a_model_that_cannot_load_leaves_error_records_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "home"))
    # no checkpoint made here, none from the package, no pretraining: prosmin_micro cannot load
    opts = RunOptions(seeds=(0,), jobs=2, results_dir=tmp_path / "r", shipped=False, pretrain_missing=False)
    out = evaluate(["prosmin_micro", "pixels"], ["digits_knn"], options=opts)
    assert [(r.model, r.record_type) for r in out] == [("prosmin_micro", "error"), ("pixels", "result")]
    assert "prosmin-bench pretrain --recipe prosmin_micro" in out[0].message


def test_generated_splits_are_made_once_before_the_models():
    refs = parallel.generated_refs([get_task_spec("digits_c"), get_task_spec("digits_knn")])
    assert len(refs) == 75 and refs[0] == "digits_c:gaussian_noise/1" and len(set(refs)) == 75
    assert parallel.generated_refs([get_task_spec("digits_knn")]) == []


def test_a_variant_is_handed_out_after_the_model_it_reads():
    specs = [get_model_spec(n) for n in ("prosmin_target_micro", "prosmin_micro", "pixels")]
    assert [specs[i].name for i in parallel.job_order(specs)] == ["prosmin_micro", "prosmin_target_micro", "pixels"]


def test_references_are_handed_out_last_to_fill_the_end_of_the_run():
    names = ("pixels_randproj", "dino_micro", "pixels", "prosmin_target_micro", "random_micro", "prosmin_micro")
    specs = [get_model_spec(n) for n in names]
    assert [specs[i].name for i in parallel.job_order(specs)] == [
        "dino_micro", "random_micro", "prosmin_micro", "prosmin_target_micro", "pixels_randproj", "pixels"]


def test_default_jobs(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert parallel.default_jobs(10, "cpu") == 2
    assert parallel.default_jobs(1, "cpu") == 1  # one model: its threads get the cores
    assert parallel.default_jobs(10, "cuda") == 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert parallel.default_jobs(10, "cpu") == 1


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5])
def test_a_job_count_that_is_not_a_positive_integer_is_refused(jobs):
    with pytest.raises(ProsminBenchError, match="Expected `jobs` to be a positive integer"):
        RunOptions(jobs=jobs)
