"""DDP: a 2-process gloo run (launched with torchrun, as a user would) against a single-process run.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2 tests/test_ddp.py OUT`` trains
the tiny config on every rank, then each rank dumps its own parameters and the results of the distributed
helpers to ``OUT`` so the test can compare ranks (only rank 0 writes the checkpoint itself).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: Tiny ProSMin (one-block 32-wide ViT, narrow heads), global batch 32 = 2 x 16, 2 global + 2 local crops.
#: Drop path is off (its masks come from each process's own generator) and so is BatchNorm in the head (on CPU
#: its batch statistics are per process; SyncBatchNorm is GPU-only): the two things that would make a 2-process
#: run differ from a 1-process run by more than float round-off.
TINY = {
    "arch_kwargs.depth": 1, "arch_kwargs.embed_dim": 32, "arch_kwargs.num_heads": 2,
    "method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16,
    "method.predictor_hidden_dim": 64, "method.drop_path_rate": 0.0, "method.head_use_bn": False,
    "optim.batch_size": 32, "optim.warmup_epochs": 0.1, "crops.local_crops": 2,
    "run.max_steps": 8, "run.checkpoint_every_steps": 4,
}
#: Stated tolerance for DDP (2 x 16 images) vs one process (32 images): the same images, augmentations and noise
#: draws (per-image generators), so only float32 summation order differs. Measured: max abs parameter difference
#: 4.5e-8 after 8 AdamW steps, max relative loss difference 1.0e-6.
PARAM_ATOL = 1e-6
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(out: Path) -> None:
    from prosmin_bench import distributed
    from prosmin_bench.pretrain import resolve_config
    from prosmin_bench.pretrain.train import Pretrainer

    torch.set_num_threads(1)
    cfg = resolve_config("prosmin_micro", epochs=1, overrides=TINY)
    trainer = Pretrainer(cfg, out / "run", device="cpu")  # joins the gloo group from torchrun's variables
    trainer.run()
    info = distributed.info()
    m = trainer.method  # what this process trained (the checkpoint is rank 0's alone)
    torch.save({"online": m.online.state_dict(), "target": m.target.state_dict(), "method_state": m.extra_state()},
               out / "run" / f"rank{info.rank}_state.pt")
    # the helpers the feature extractor will use
    r, w = info.rank, info.world_size
    local = torch.arange(r + 2, dtype=torch.float32).unsqueeze(1) + 100 * r  # ranks hold 2 and 3 rows
    gathered = distributed.all_gather_varlen(local)
    shard = distributed.shard_indices(11)
    in_order = distributed.gather_rows(np.array(list(shard), dtype=np.int64), 11)
    mean = distributed.all_reduce_mean(torch.tensor([float(r)]))
    json.dump({"rank": r, "world": w, "backend": info.backend, "gathered": gathered.squeeze(1).tolist(),
               "in_order": in_order.tolist(), "mean": mean.item()}, open(out / f"helpers{r}.json", "w"))
    distributed.destroy()


def _torchrun(script: Path, *args: str, nproc: int = 2, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """``script args...`` on ``nproc`` local processes started by torchrun, as a user would, with the checkout on
    the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _launch(out: Path) -> subprocess.CompletedProcess:
    return _torchrun(Path(__file__), str(out))


def test_shard_indices_cover_everything_once():
    from prosmin_bench.distributed import shard_indices

    for n in (0, 1, 7, 10, 101):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in shard_indices(n, r, world)]
            assert got == list(range(n))
            sizes = [len(shard_indices(n, r, world)) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_are_identities():
    from prosmin_bench import distributed

    t = torch.randn(3, 2)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert torch.equal(distributed.all_reduce_mean(t), t) and torch.equal(distributed.all_gather_varlen(t), t)
    distributed.barrier()


def test_a_single_process_torchrun_launch_joins_a_group_of_one(monkeypatch):
    """torchrun --nproc_per_node=1 (TORCHELASTIC_RUN_ID set, WORLD_SIZE=1) takes the distributed path, as on a
    one-GPU machine where that is the only way to run NCCL; plain ``python`` with WORLD_SIZE=1 does not."""
    from prosmin_bench import distributed

    for key in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched_by_torchrun()
    assert distributed.init_from_env("cpu").backend is None and not distributed.is_initialized()

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with pytest.raises(distributed.DistributedError, match=r"\['RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        distributed.init_from_env("cpu")

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    try:
        info = distributed.init_from_env("cpu")
        assert (info.rank, info.world_size, info.backend) == (0, 1, "gloo") and distributed.is_initialized()
        assert torch.equal(distributed.all_reduce_mean(torch.tensor([3.0])), torch.tensor([3.0]))
    finally:
        distributed.destroy()
    assert not distributed.is_initialized()


#: Joins the group, then imports what a model load imports (timm -> torchvision -> torch._dynamo), leaves the group,
#: and prints how many threads the process had before joining and after leaving.
_LEAVE_SCRIPT = """
import os
from prosmin_bench import distributed
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
info = distributed.init_from_env("cpu", timeout_s=60)
import timm  # noqa: F401
distributed.destroy()
print("THREADS", info.backend, before, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_leaving_the_group_ends_its_threads_even_after_importing_the_model_stack(tmp_path):
    """A group that outlives destroy() keeps gloo worker threads running into interpreter shutdown, where they can
    abort the process after its work is done (seen as a rare 'terminate called without an active exception', exit
    -6, at the end of a torchrun job). Importing torch._dynamo after joining used to keep the group alive."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE_SCRIPT)
    res = _torchrun(script, nproc=1, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("THREADS")]
    _, backend, before, after = line.split()
    assert backend == "gloo"
    assert int(after) == int(before), f"{before} threads before joining the group, {after} after leaving it"


#: Two pretraining calls in one torchrun job, counting how often a process group is created, then whether the
#: process is still in the group when the interpreter exits (atexit runs handlers in reverse order of
#: registration, so this one, registered first, runs after the library's).
_TWICE_SCRIPT = """
import atexit, json, sys
from pathlib import Path
import torch.distributed as dist
out = Path(sys.argv[1])
atexit.register(lambda: (out / "at_exit.json").write_text(json.dumps({"in_group": dist.is_initialized()})))
created = []
real_init = dist.init_process_group
dist.init_process_group = lambda *a, **k: (created.append(1), real_init(*a, **k))[1]
from prosmin_bench.pretrain import pretrain
tiny = json.loads(sys.argv[2])
paths = [str(pretrain("prosmin_micro", epochs=1, out_dir=out / f"run{k}", device="cpu", overrides=tiny))
         for k in range(2)]
(out / "twice.json").write_text(json.dumps({"created": len(created), "paths": paths,
                                            "in_group": dist.is_initialized()}))
"""


def test_two_pretrain_calls_in_one_torchrun_job_share_one_group_left_at_exit(tmp_path):
    """Re-creating the default group on torchrun's store after destroying it hung now and then (2 of 12 jobs), so
    pretrain() stays in the group it joined and a second call reuses it; the group is left at exit."""
    script = tmp_path / "twice.py"
    script.write_text(_TWICE_SCRIPT)
    tiny = {**TINY, "run.max_steps": 1}
    res = _torchrun(script, str(tmp_path), json.dumps(tiny), nproc=1, timeout=300,
                    env={"PROSMIN_BENCH_HOME": str(tmp_path / "home")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads((tmp_path / "twice.json").read_text())
    assert got["created"] == 1 and got["in_group"] is True
    assert [Path(p).parent.name for p in got["paths"]] == ["run0", "run1"]
    assert all(Path(p).is_file() for p in got["paths"])
    assert json.loads((tmp_path / "at_exit.json").read_text()) == {"in_group": False}


def test_two_process_gloo_run_matches_one_process(tmp_path):
    from prosmin_bench.pretrain import pretrain

    res = _launch(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Warning" not in res.stderr, res.stderr[-3000:]  # e.g. DDP's FutureWarning on deprecated arguments
    ranks = [torch.load(tmp_path / "run" / f"rank{r}_state.pt", map_location="cpu", weights_only=True) for r in (0, 1)]
    # identical parameters on both ranks (online, target) and identical centres
    for part in ("online", "target", "method_state"):
        for k, v in ranks[0][part].items():
            assert torch.equal(v, ranks[1][part][k]), f"{part}.{k} differs between ranks"
    helpers = [json.load(open(tmp_path / f"helpers{r}.json")) for r in (0, 1)]
    assert {h["backend"] for h in helpers} == {"gloo"} and {h["world"] for h in helpers} == {2}
    assert helpers[0]["gathered"] == helpers[1]["gathered"] == [0.0, 1.0, 100.0, 101.0, 102.0]
    assert helpers[0]["in_order"] == list(range(11)) and helpers[0]["mean"] == 0.5

    # the same global batch in one process
    single = tmp_path / "single"
    pretrain("prosmin_micro", epochs=1, out_dir=single, device="cpu", overrides=TINY)
    a = torch.load(single / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 8 and b["world_size"] == 2 and len(b["rng"]) == 2
    la = [json.loads(x)["loss"] for x in (single / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(lb, la, rtol=LOSS_RTOL)
    for part in ("online", "target", "method_state"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, atol=PARAM_ATOL, rtol=0)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
