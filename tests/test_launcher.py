"""``run --launcher local|slurm``: the (model, task) grid as submitit jobs (prosmin_bench/launcher.py, issue 21).

The reference is the in-process run of the same command (``--launcher none``); ``--launcher local`` runs real
submitit jobs (``LocalExecutor``: one subprocess per pair), ``--launcher slurm`` is checked against the sbatch file
submitit writes, with stand-ins for ``sbatch`` and ``srun``.
"""

import contextlib
import io
import json
import os
import sys

import pytest

from prosmin_bench import cli, distributed, launcher, runner
from prosmin_bench.runner import RunOptions

submitit = pytest.importorskip("submitit")

MODEL, TASKS = "random_micro", ("digits_knn", "digits_linear")
RUN = ["run", "--model", MODEL, "--task", TASKS[0], "--task", TASKS[1], "--seeds", "0"]
#: What makes a record's numbers: equal in both runs (the timestamp, wall time and execution info may differ).
SAME = ("record_type", "per_seed", "mean", "std", "ci95", "protocol", "run_config", "weights_sha256", "seeds")


def _records(folder):
    return {f"{p.parent.name}/{p.stem}": json.loads(p.read_text()) for p in sorted(folder.glob("*/*.json"))}


def _main(argv):
    """``prosmin-bench ARGV``: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _table_rows(out):
    """The rows of run's console table, split at its column gaps (two spaces or more)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith(f"{MODEL} ")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The two pairs evaluated with ``--launcher local`` and in this process, each with its own cache."""
    root = tmp_path_factory.mktemp("grid")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for name, extra in (("local", ["--launcher", "local"]), ("serial", [])):
            mp.setenv("PROSMIN_BENCH_HOME", str(root / f"home_{name}"))
            runs[name] = _main([*RUN, "--results", str(root / name), *extra])
    return root, runs


def test_local_jobs_give_the_in_process_records_and_page(grid):
    root, runs = grid
    assert runs["local"][0] == runs["serial"][0] == 0, runs["local"][2][-2000:]
    local, serial = _records(root / "local"), _records(root / "serial")
    assert sorted(local) == sorted(serial) == [f"{MODEL}/{t}" for t in sorted(TASKS)]
    for key in local:
        assert {k: local[key][k] for k in SAME} == {k: serial[key][k] for k in SAME}
        assert local[key]["record_type"] == "result"
    # the same console table (up to the wall times and the results folder), every pair computed by this run
    local_rows, serial_rows = (_table_rows(runs[k][1]) for k in ("local", "serial"))
    assert [r[:-1] for r in local_rows] == [r[:-1] for r in serial_rows] and len(local_rows) == len(TASKS)
    assert all(r[-1].startswith("computed (") for r in local_rows + serial_rows), runs["local"][1]
    logs = sorted(p.name for p in (root / "local" / ".submitit").iterdir())
    assert sum(n.endswith("_0_log.err") for n in logs) == 2  # one job per (model, task), logs beside the results


def test_current_records_are_not_submitted(grid, monkeypatch):
    root, _ = grid
    before = (root / "local").joinpath(MODEL, f"{TASKS[0]}.json").read_bytes()
    monkeypatch.setattr(launcher, "make_executor", lambda *a, **k: pytest.fail("submitted a job"))
    code, out, _ = _main([*RUN, "--results", str(root / "local"), "--launcher", "local"])
    assert code == 0 and [(r[1], r[-1]) for r in _table_rows(out)] == [(f"{t}@2", "reused") for t in TASKS], out
    assert (root / "local").joinpath(MODEL, f"{TASKS[0]}.json").read_bytes() == before


class _Job:
    def __init__(self, job_id, error=None):
        self.job_id, self.error = job_id, error
        self.paths = type("Paths", (), {"stderr": f"/logs/{job_id}_0_log.err"})

    def results(self):
        if self.error is not None:
            raise self.error
        return [[]]


class _Executor:
    """Records what would be submitted; its jobs return no records."""

    submitted: list = []
    error = None

    def map_array(self, fn, models, tasks):
        _Executor.submitted = [type(fn), list(zip(models, tasks))]
        return [_Job(str(i), self.error) for i in range(len(models))]


def test_only_the_pairs_without_a_current_record_are_submitted(grid, tmp_path, monkeypatch):
    root, _ = grid
    results = tmp_path / "results"
    (results / MODEL).mkdir(parents=True)
    (results / MODEL / f"{TASKS[0]}.json").write_bytes((root / "local" / MODEL / f"{TASKS[0]}.json").read_bytes())
    monkeypatch.setattr(launcher, "make_executor", lambda *a, **k: _Executor())
    assert _main([*RUN, "--results", str(results), "--launcher", "local"])[0] == 0
    assert _Executor.submitted == [launcher.GridJob, [(MODEL, TASKS[1])]]


def test_a_job_that_died_leaves_an_error_record_naming_its_log(tmp_path, monkeypatch):
    executor = _Executor()
    executor.error = submitit.core.utils.FailedJobError(  # as submitit words it (submitit/core/core.py)
        "Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
        "last):\n  File \"x.py\", line 1\nMemoryError: out of memory\n\n----------------------\nYou can check "
        "full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /logs/0_0_log.err\n")
    monkeypatch.setattr(launcher, "make_executor", lambda *a, **k: executor)
    code, _, err = _main(["run", "--model", MODEL, "--task", TASKS[0], "--seeds", "0", "--results", str(tmp_path),
                          "--launcher", "local"])
    assert code == 1 and "1 of 1 (model, task) pairs failed" in err
    rec = json.loads((tmp_path / MODEL / f"{TASKS[0]}.json").read_text())
    assert rec["record_type"] == "error"
    assert rec["message"] == "job 0 failed (MemoryError: out of memory); its log: /logs/0_0_log.err"


def test_a_requeued_call_skips_the_records_already_written(grid, tmp_path, monkeypatch):
    root, _ = grid
    job = launcher.GridJob(RunOptions(seeds=(0,), results_dir=root / "local"))
    assert isinstance(job, submitit.helpers.Checkpointable)
    requeued = job.checkpoint(MODEL, TASKS[0])  # what submitit calls on the time-limit / preemption signal
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert requeued.function is job and requeued.args == (MODEL, TASKS[0])
    requeued.dump(tmp_path / "requeued.pkl")  # submitit writes it over the job's pickle, then requeues the job
    again = submitit.helpers.DelayedSubmission.load(tmp_path / "requeued.pkl")
    path = root / "local" / MODEL / f"{TASKS[0]}.json"
    before = path.read_bytes()
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("recomputed a current record"))
    (rec,) = again.result()  # the requeued job, run here
    assert rec.record_type == "result" and (rec.model, rec.task) == (MODEL, TASKS[0])
    assert path.read_bytes() == before


def test_a_multi_gpu_job_exports_what_the_distributed_code_reads(monkeypatch):
    """--gpus-per-job 2: each of the job's processes sets torchrun's variables before the evaluation starts."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(key, "")  # so that the test's end removes what the job exports
        monkeypatch.delenv(key)
    # the environment of task 1 of a 2-task local submitit job
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    seen = {}

    def evaluate(models, tasks, options):
        seen.update({k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")})
        seen["port"] = os.environ.get("MASTER_PORT", "")
        seen["launched"] = distributed.launched_by_torchrun()
        seen["call"] = (models, tasks, options.jobs)
        return []

    monkeypatch.setattr("prosmin_bench.suite.evaluate", evaluate)
    assert launcher.GridJob(RunOptions(seeds=(0,)), processes=2)(MODEL, TASKS[0]) == []
    assert {k: seen[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {"RANK": "1", "WORLD_SIZE": "2",
                                                                         "LOCAL_RANK": "1"}
    assert seen["MASTER_ADDR"] and seen["port"].isdigit() and seen["launched"] is True
    assert seen["call"] == ([MODEL], [TASKS[0]], 1)


@pytest.mark.slow
def test_a_two_process_local_job_gives_the_in_process_record(grid, tmp_path, monkeypatch):
    """--gpus-per-job 2 on the CPU: two gloo ranks shard the extraction; the record is the in-process one."""
    root, _ = grid
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["run", "--model", MODEL, "--task", TASKS[0], "--seeds", "0", "--device", "cpu"]
    assert _main([*args, "--results", str(tmp_path), "--launcher", "local", "--gpus-per-job", "2"])[0] == 0
    two, one = _records(tmp_path)[f"{MODEL}/{TASKS[0]}"], _records(root / "serial")[f"{MODEL}/{TASKS[0]}"]
    assert {k: two[k] for k in SAME} == {k: one[k] for k in SAME}


def test_slurm_submits_one_array_and_returns(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):  # stand-ins that answer as SLURM does
        (bin_dir / tool).write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    code, out, err = _main([*RUN, "--results", str(tmp_path / "r"), "--launcher", "slurm", "--slurm-partition",
                            "gpu", "--gpus-per-job", "2", "--slurm-time", "30", "--slurm-mem", "64G",
                            "--slurm-account", "lab"])
    assert code == 0, err
    logs = tmp_path / "r" / ".submitit"
    assert f"  4242_0  {MODEL} / {TASKS[0]}\n  4242_1  {MODEL} / {TASKS[1]}\n" in out and str(logs) in out
    sbatch = (logs / "4242_submission.sh").read_text().splitlines()
    for line in ("--partition=gpu", "--array=0-1%2", "--gpus-per-node=2", "--ntasks-per-node=2", "--nodes=1",
                 "--time=30", "--mem=65536M", "--account=lab", "--cpus-per-task=10", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in sbatch
    assert not list((tmp_path / "r").glob("*/*.json"))  # nothing ran here


@pytest.mark.parametrize("extra, message", [
    (["--launcher", "slurm"], "--launcher slurm needs --slurm-partition"),
    (["--launcher", "local", "--jobs", "2"], "drop one of them"),
    (["--slurm-partition", "gpu"], "--slurm-partition applies to --launcher local|slurm"),
    (["--gpus-per-job", "2"], "--gpus-per-job applies to --launcher local|slurm"),
    (["--launcher", "slurm", "--slurm-partition", "gpu", "--leaderboard", "board.md"], "needs --wait"),
    (["--launcher", "slurm", "--slurm-partition", "gpu"], "needs SLURM's sbatch and srun"),
])
def test_bad_combinations_are_one_line_errors(extra, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    monkeypatch.setattr(launcher, "pending_pairs", lambda *a: pytest.fail("started work"))
    code, out, err = _main([*RUN, "--results", str(tmp_path / "r"), *extra])
    assert code == 2 and out == ""
    assert err.startswith("prosmin-bench: error: ") and err.count("\n") == 1 and message in err, err


def test_without_submitit_a_launcher_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` now raises ImportError
    code, _, err = _main([*RUN, "--results", str(tmp_path), "--launcher", "local"])
    assert code == 2 and err == ("prosmin-bench: error: --launcher local|slurm needs submitit: pip install "
                                 "'prosmin-bench[cluster]'\n")
