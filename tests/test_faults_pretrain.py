"""Faults around pretraining and where runs write (issue 15): an interrupted pretraining is resumed or refused,
never evaluated; SIGTERM is handled like Ctrl-C; two runs needing one missing model pretrain it once; a damaged
recipe checkpoint says how to make it again; the first command leaves the checkout as it was.

As in tests/test_faults.py, every fault is driven through the command line (``main(argv)`` in-process, or
``python -m prosmin_bench`` in a subprocess for signals and concurrency) and each test asserts the message a user
sees and the state of the folders afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prosmin_bench import config
from prosmin_bench.errors import WeightsError
from prosmin_bench.models.weights import sha256_file
from prosmin_bench.paths import recipe_checkpoint_path, record_path
from prosmin_bench.results import ResultRecord, read_record
from test_faults import CARDS, TINY_PRETRAIN, assert_run_error, cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

#: A one-block 32-wide ProSMin on the digits at batch 64: 22 steps of ~0.1 s make one epoch (its whole run).
TINY_RECIPE = "tiny_prosmin"
TINY_OVERRIDES = {**TINY_PRETRAIN, "optim.batch_size": 64, "run.monitor_every": 0}
TINY_STEPS = 22

#: The model the tiny recipe makes: a card, so `run --model tiny_prosmin` pretrains it when it is missing.
TINY_CARD = f"""
    name = "{TINY_RECIPE}"
    arch = "vit_micro"
    scale = "mini"
    method = "prosmin"
    [arch_kwargs]
    depth = 1
    embed_dim = 32
    num_heads = 2
    [weights]
    recipe = "{TINY_RECIPE}"
    [preprocess]
    resize = 32
    crop = 32
    interpolation = "bilinear"
    mean = [0.5, 0.5, 0.5]
    std = [0.5, 0.5, 0.5]
"""


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """main() points the package's log handler at this test's captured stderr; the next test must not log to it."""
    logger = logging.getLogger("prosmin_bench")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = handlers, propagate
    logger.setLevel(level)


def register_tiny_recipe() -> None:
    """Register ``tiny_prosmin`` (also called by the subprocesses of the lock test)."""
    from prosmin_bench.pretrain import resolve_config
    from prosmin_bench.pretrain.recipes import RECIPES, Recipe

    cfg = dataclasses.replace(resolve_config("prosmin_micro", epochs=1, overrides=TINY_OVERRIDES), recipe=TINY_RECIPE)
    RECIPES.add(TINY_RECIPE, Recipe(TINY_RECIPE, cfg, "a 22-step ProSMin for the tests", scale="mini"),
                origin=__name__, replace=True)


@pytest.fixture
def tiny(tmp_path):
    """The tiny recipe registered, and a card folder with its model card and the quick fault_knn task."""
    from prosmin_bench.pretrain.recipes import RECIPES

    register_tiny_recipe()
    d = tmp_path / "cards"
    d.mkdir()
    (d / "fault_knn.toml").write_text(textwrap.dedent(CARDS["fault_knn.toml"]))
    (d / f"{TINY_RECIPE}.toml").write_text(textwrap.dedent(TINY_CARD))
    yield d
    RECIPES.remove(TINY_RECIPE)


def _interrupted_pretraining(monkeypatch, at: int, **pretrain_kwargs) -> Path:
    """Pretrain the tiny recipe and Ctrl-C it (a real SIGINT) in the forward pass of step ``at``: the loop finishes
    that step, checkpoints it and re-raises. Returns the checkpoint path."""
    from prosmin_bench.pretrain import pretrain
    from prosmin_bench.pretrain.methods.prosmin import ProSMin

    real = ProSMin.forward

    def forward(self, batch, progress):
        if progress.step == at:
            signal.raise_signal(signal.SIGINT)
        return real(self, batch, progress)

    monkeypatch.setattr(ProSMin, "forward", forward)
    with pytest.raises(KeyboardInterrupt) as info:
        pretrain(TINY_RECIPE, device="cpu", **pretrain_kwargs)
    monkeypatch.setattr(ProSMin, "forward", real)
    path, step = info.value.checkpoint
    assert step == at + 1  # the step that was running when the signal came, finished and saved
    return Path(path)


def _logged_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# 1. An interrupted automatic pretraining is resumed to the end by the next run, then evaluated.


def test_interrupted_automatic_pretraining_is_resumed_then_evaluated(tiny, capsys, monkeypatch):
    from prosmin_bench.pretrain.methods.prosmin import ProSMin

    real = ProSMin.forward

    def forward(self, batch, progress):  # Ctrl-C in the middle of step 5 of the pretraining that `run` starts
        if progress.step == 5:
            signal.raise_signal(signal.SIGINT)
        return real(self, batch, progress)

    monkeypatch.setattr(ProSMin, "forward", forward)
    argv = ["--cards", str(tiny), "run", "--model", TINY_RECIPE, "--task", "fault_knn", "--seeds", "0", "--device",
            "cpu"]
    code, _, err = cli(capsys, "-q", *argv)
    assert code == 130
    assert err == "prosmin-bench: interrupted; finished results and the pretraining (step 6) are saved, run again to " \
                  "resume\n"
    path = recipe_checkpoint_path(TINY_RECIPE)
    part = torch.load(path, map_location="cpu", weights_only=True)
    assert (part["step"], part["finished"]) == (6, False)
    assert not record_path(config.default_results_dir(), TINY_RECIPE, "fault_knn").exists()

    monkeypatch.setattr(ProSMin, "forward", real)
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert f"{TINY_RECIPE} (recipe {TINY_RECIPE}): its pretraining was interrupted at step 6 of {TINY_STEPS}; " \
           "resuming it" in err
    done = torch.load(path, map_location="cpu", weights_only=True)
    assert (done["step"], done["finished"]) == (TINY_STEPS, True)
    assert _logged_steps(path.parent) == list(range(TINY_STEPS))  # every step once: resumed, not restarted
    rec = read_record(record_path(config.default_results_dir(), TINY_RECIPE, "fault_knn"))
    assert isinstance(rec, ResultRecord) and rec.weights_sha256 == sha256_file(path)


# ---------------------------------------------------------------------------------------------------------------
# 2. An interrupted checkpoint that cannot be resumed by the run is refused, never evaluated.


@pytest.mark.parametrize("where", ["no_pretrain", "weights", "weights_dir"])
def test_an_interrupted_checkpoint_that_run_does_not_resume_is_refused(tiny, tmp_path, capsys, monkeypatch, where):
    from prosmin_bench.models import get_model

    if where == "no_pretrain":
        path = _interrupted_pretraining(monkeypatch, at=3)
        extra, resume = ["--no-pretrain"], f"`prosmin-bench pretrain --recipe {TINY_RECIPE} --resume`"
    else:
        folder = tmp_path / "ckpts" / TINY_RECIPE
        path = _interrupted_pretraining(monkeypatch, at=3, out_dir=folder)
        extra = ["--weights", str(path)] if where == "weights" else ["--weights-dir", str(folder.parent)]
        resume = f"`prosmin-bench pretrain --recipe {TINY_RECIPE} --resume --out {folder}`"
    kept = path.read_bytes()
    code, _, err = cli(capsys, "-q", "--cards", str(tiny), "run", "--model", TINY_RECIPE, "--task", "fault_knn",
                       "--seeds", "0", "--device", "cpu", *extra)
    message = (f"Checkpoint {str(path)!r} is an interrupted pretraining (step 4 of {TINY_STEPS}, recipe "
               f"{TINY_RECIPE}), not a finished model; finish it with {resume}, then run again")
    assert_run_error(code, err, message)
    assert not isinstance(read_record(record_path(config.default_results_dir(), TINY_RECIPE, "fault_knn")),
                          ResultRecord)
    assert path.read_bytes() == kept  # neither trained further nor deleted
    with pytest.raises(WeightsError) as info:  # the library refuses it too
        get_model(TINY_RECIPE, weights=path)
    assert str(info.value) == message


def test_an_interrupted_checkpoint_of_other_settings_is_refused_with_both_ways_out(tiny, capsys, monkeypatch):
    path = _interrupted_pretraining(monkeypatch, at=3, overrides={"optim.lr": 1e-3})
    kept = path.read_bytes()
    code, _, err = cli(capsys, "-q", "--cards", str(tiny), "run", "--model", TINY_RECIPE, "--task", "fault_knn",
                       "--seeds", "0", "--device", "cpu")
    assert_run_error(code, err, "is an interrupted pretraining (step 4 of 22",
                     f"finish it with `prosmin-bench pretrain --recipe {TINY_RECIPE} --resume` with the --epochs and "
                     "--set values it was started with, then run again",
                     f"or move {str(path.parent)!r} away to let `run` pretrain recipe {TINY_RECIPE} anew",
                     "(the checkpoint differs from it in optim.lr)")
    assert path.read_bytes() == kept


# ---------------------------------------------------------------------------------------------------------------
# 3. A damaged recipe checkpoint: there is nothing to download; say how to make it again.


def _truncated(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"w": torch.zeros(4096)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("where", ["default", "weights"])
def test_a_truncated_recipe_checkpoint_says_how_to_make_it_again(tiny, tmp_path, capsys, where):
    from prosmin_bench.models import get_model

    if where == "default":
        path, extra = _truncated(recipe_checkpoint_path(TINY_RECIPE)), []
        advice = (f"delete it and make it again with `prosmin-bench pretrain --recipe {TINY_RECIPE}` or run again to "
                  "re-pretrain it automatically")
    else:
        path = _truncated(tmp_path / "mine" / "checkpoint.pt")
        extra = ["--weights", str(path)]
        advice = f"delete it and make it again with `prosmin-bench pretrain --recipe {TINY_RECIPE} --out {path.parent}`"
    kept = path.read_bytes()
    code, _, err = cli(capsys, "-q", "--cards", str(tiny), "run", "--model", TINY_RECIPE, "--task", "fault_knn",
                       "--seeds", "0", "--device", "cpu", *extra)
    assert_run_error(code, err, f"Weights file {str(path)!r} is truncated or not a PyTorch checkpoint", advice)
    assert "download" not in err.strip().splitlines()[-1]
    assert path.read_bytes() == kept  # never deleted by the suite
    with pytest.raises(WeightsError, match="re-pretrain it automatically" if where == "default" else "--out"):
        get_model(TINY_RECIPE, weights=None if where == "default" else path)


# ---------------------------------------------------------------------------------------------------------------
# 4. Ctrl-C and SIGTERM during pretraining: a checkpoint of the current step, one line, resumable exactly.


def test_ctrl_c_during_pretraining_saves_its_step_and_says_how_to_resume(tiny, capsys, monkeypatch):
    from prosmin_bench.pretrain.methods.prosmin import ProSMin

    real = ProSMin.forward

    def forward(self, batch, progress):
        if progress.step == 6:
            signal.raise_signal(signal.SIGINT)
        return real(self, batch, progress)

    monkeypatch.setattr(ProSMin, "forward", forward)
    out = recipe_checkpoint_path(TINY_RECIPE)
    code, stdout, err = cli(capsys, "-q", "pretrain", "--recipe", TINY_RECIPE, "--device", "cpu")
    assert code == 130 and stdout == ""
    assert err == (f"prosmin-bench: interrupted; checkpoint of step 7 saved to {out}: run the same command with "
                   "--resume to continue\n")
    assert torch.load(out, map_location="cpu", weights_only=True)["step"] == 7 == len(_logged_steps(out.parent))
    assert list(out.parent.glob("*.tmp")) == []


def _pretrain_cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ov = {**TINY_PRETRAIN, "run.monitor_every": 0, "run.max_steps": 16, "run.checkpoint_every_steps": 5}
    cmd = [sys.executable, "-m", "prosmin_bench", "-q", "pretrain", "--recipe", "prosmin_micro", "--epochs", "1",
           "--out", str(out), "--device", "cpu", *[f"--set={k}={v}" for k, v in ov.items()], *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def test_a_terminated_pretraining_saves_its_step_and_resumes_equal_to_an_uninterrupted_run(tmp_path):
    """SIGTERM, as SLURM or Kubernetes send it: exit 143, one line, a checkpoint of the step it was in (not the last
    periodic one), and --resume ends equal to an uninterrupted run (float32 round-off at most)."""
    full, out = tmp_path / "full", tmp_path / "out"
    p_full, proc = _pretrain_cli(full), _pretrain_cli(out)
    deadline = time.monotonic() + 120
    try:  # past the first periodic checkpoint (step 5), before the second
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "checkpoint.pt").is_file() and (out / "log.jsonl").is_file() and len(_logged_steps(out)) >= 6:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    assert step == max(_logged_steps(out)) + 1 and 6 <= step < 16
    assert err == (f"prosmin-bench: terminated (SIGTERM); checkpoint of step {step} saved to {out / 'checkpoint.pt'}: "
                   "run the same command with --resume to continue\n")
    assert list(out.glob("*.tmp")) == []

    resumed = _pretrain_cli(out, "--resume")
    for p in (resumed, p_full):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
    ref = {r["step"]: r["loss"] for r in map(json.loads, (full / "log.jsonl").read_text().splitlines())}
    assert sorted(losses) == sorted(ref) == list(range(16))
    np.testing.assert_allclose([losses[s] for s in range(16)], [ref[s] for s in range(16)], rtol=1e-6, atol=1e-8)
    a = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 16
    for part in ("online", "target", "method_state"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# 5. SIGTERM during a run's feature extraction: one line, exit 143, no temporary file left, resumable.


def test_a_run_terminated_mid_extraction_says_one_line_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    cards = tmp_path / "cards"
    cards.mkdir()
    (cards / "fault_knn.toml").write_text(textwrap.dedent(CARDS["fault_knn.toml"]))
    home, res = tmp_path / "home", tmp_path / "res"
    env = {**os.environ, "PROSMIN_BENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("PROSMIN_BENCH_CARDS", None)
    argv = ["--cards", str(cards), "run", "--model", "random_micro", "--task", "fault_knn", "--seeds", "0",
            "--device", "cpu", "--results", str(res)]
    proc = subprocess.Popen([sys.executable, "-m", "prosmin_bench", "-q", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline and not list(home.rglob("*.tmp")):
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before its extraction could be terminated"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err == "prosmin-bench: terminated (SIGTERM); finished results are saved, run again to resume\n"
    assert list(home.rglob("*.tmp")) == [] and list(tmp_path.rglob("*.tmp")) == []
    assert not record_path(res, "random_micro", "fault_knn").exists()
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(home))
    code, _, err = cli(capsys, "-q", *argv)
    assert code == 0, err
    assert isinstance(read_record(record_path(res, "random_micro", "fault_knn")), ResultRecord)


# ---------------------------------------------------------------------------------------------------------------
# 6. Two runs that need the same missing model: one pretrains it, the other waits and uses its checkpoint.

_LOCK_SCRIPT = """
import logging, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import test_faults_pretrain as t
t.register_tiny_recipe()
import prosmin_bench.suite as P
from prosmin_bench import cards
from prosmin_bench.models import get_model, get_model_spec
from prosmin_bench.runner import RunOptions
from prosmin_bench.suite import ensure_weights
cards.add_card_dir(sys.argv[1])
real = P.pretrain
def spy(*args, **kwargs):
    print("PRETRAINING", flush=True)
    return real(*args, **kwargs)
P.pretrain = spy
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
go = Path(sys.argv[2])
while not go.exists():  # both start together, after their imports
    time.sleep(0.005)
spec = get_model_spec(t.TINY_RECIPE)
ensure_weights(spec, RunOptions(device="cpu"))
print("SHA", get_model(spec).weights_sha256, flush=True)
"""


def test_two_runs_needing_one_missing_model_pretrain_it_once(tiny, tmp_path):
    home, go = tmp_path / "home", tmp_path / "go"
    env = {**os.environ, "PROSMIN_BENCH_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = _LOCK_SCRIPT.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tiny), str(go)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    logs = "".join(outs)
    assert logs.count("PRETRAINING") == 1, logs
    assert logs.count(f"waiting for another process that is pretraining recipe {TINY_RECIPE}") == 1, logs
    shas = {line.split()[1] for line in logs.splitlines() if line.startswith("SHA ")}
    ckpt = home / "checkpoints" / TINY_RECIPE / "checkpoint.pt"
    assert shas == {sha256_file(ckpt)}  # both evaluate the one finished checkpoint
    assert _logged_steps(ckpt.parent) == list(range(TINY_STEPS))


# ---------------------------------------------------------------------------------------------------------------
# 7. The README's first command leaves a checkout as it was: results go to $PROSMIN_BENCH_HOME/results.


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_first_command_leaves_a_clone_unmodified(tmp_path, capsys, monkeypatch):
    clone = tmp_path / "clone"
    committed = REPO / "leaderboards" / "results" / "random_micro" / "digits_knn.json"
    (clone / "leaderboards" / "results" / "random_micro").mkdir(parents=True)
    shutil.copy(committed, clone / "leaderboards" / "results" / "random_micro" / "digits_knn.json")
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "records")
    before = committed.read_bytes()
    monkeypatch.chdir(clone)

    code, out, err = cli(capsys, "-q", "run", "--model", "random_micro", "--task", "digits_knn", "--seeds", "5")
    assert code == 0, err
    assert _git(clone, "status", "--porcelain", "--untracked-files=all", "--ignored") == ""
    assert committed.read_bytes() == before  # the checkout's own records are not touched either
    mine = config.home() / "results"
    assert isinstance(read_record(record_path(mine, "random_micro", "digits_knn")), ResultRecord)
    assert sorted(p.name for p in mine.rglob("*")) == ["digits_knn.json", "random_micro"]  # no lock beside it
    code, board, _ = cli(capsys, "leaderboard")  # reads the same folder by default
    assert code == 0 and "random_micro" in board and "digits_knn@2" in board
    assert _git(clone, "status", "--porcelain", "--untracked-files=all", "--ignored") == ""
