"""CPU thread policy (``prosmin_bench.threads``): environment set only where unset, torch's thread counts as
torch itself reports them (in a fresh process, so this one keeps its single thread), argument checks, and an
import that loads no torch (the CLI must set OpenMP's variables before torch loads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prosmin_bench import threads

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in threads.REPORTED_ENV}
    proc = subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_prepare_environment_sets_the_wait_policy_only_where_unset():
    env = {"PATH": "/bin"}
    threads.prepare_environment(env)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    mine = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}
    threads.prepare_environment(mine)
    assert mine == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "10000"}  # the user's choice stands


_APPLY = """
import json, os
from prosmin_bench import threads
threads.prepare_environment()
import torch
cores = threads.usable_cores()
out = {"cores": cores, "wait_policy": os.environ.get("OMP_WAIT_POLICY")}
s = threads.apply(None)
out["default"] = [s.intra_op_threads, torch.get_num_threads(), s.inter_op_threads, torch.get_num_interop_threads(),
                  s.source, s.jobs]
s = threads.apply(None, jobs=2)
out["jobs2"] = [s.intra_op_threads, torch.get_num_threads(), s.source]
s = threads.apply(3)
out["explicit"] = [s.intra_op_threads, torch.get_num_threads(), s.source]
os.environ["OMP_NUM_THREADS"] = "1"
out["omp"] = [threads.apply(None, jobs=2).source, torch.get_num_threads()]
os.environ["PROSMIN_BENCH_THREADS"] = "2"
out["env"] = [threads.apply(None).source, torch.get_num_threads()]
out["argument_wins"] = [threads.apply(1).source, torch.get_num_threads()]
info = threads.execution_info()
out["info"] = json.loads(json.dumps(info))
out["info_torch"] = [torch.get_num_threads(), torch.get_num_interop_threads()]
print(json.dumps(out))
"""


def test_apply_sets_torch_threads_in_a_fresh_process():
    out = _run(_APPLY)
    cores = out["cores"]
    assert out["wait_policy"] == "PASSIVE"
    # default: the usable cores shared by the jobs, at least one thread each; inter-op threads as many
    assert out["default"] == [cores, cores, cores, cores, "default", 1]
    assert out["jobs2"] == [max(1, cores // 2), max(1, cores // 2), "default"]
    assert out["explicit"] == [3, 3, "argument"]
    assert out["omp"] == ["OMP_NUM_THREADS", 1]  # the user's (or torchrun's) OMP_NUM_THREADS beats the default
    assert out["env"] == ["PROSMIN_BENCH_THREADS", 2]  # ... and PROSMIN_BENCH_THREADS beats OMP_NUM_THREADS
    assert out["argument_wins"] == ["argument", 1]
    info = out["info"]
    assert [info["intra_op_threads"], info["inter_op_threads"]] == out["info_torch"]
    assert info["usable_cores"] == cores and info["jobs"] == 1 and info["threads_source"] == "argument"
    assert info["env"]["OMP_WAIT_POLICY"] == "PASSIVE" and info["env"]["PROSMIN_BENCH_THREADS"] == "2"
    if sys.platform.startswith("linux"):
        assert info["openmp_runtime"] in ("libgomp", "libiomp5", "libomp")


@pytest.mark.parametrize(("threads_arg", "jobs", "message"), [
    (0, 1, "Expected `threads` to be a positive integer, but got 0"),
    (-2, 1, "Expected `threads` to be a positive integer, but got -2"),
    (1.5, 1, "Expected `threads` to be a positive integer, but got 1.5"),
    (True, 1, "Expected `threads` to be a positive integer, but got True"),
    (None, 0, "Expected `jobs` to be a positive integer, but got 0"),
])
def test_invalid_counts_are_refused_before_torch_is_touched(threads_arg, jobs, message):
    before = torch.get_num_threads()
    with pytest.raises(threads.ThreadConfigError) as err:
        threads.apply(threads_arg, jobs=jobs)
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "abc", "-1"])
def test_invalid_environment_value_is_refused(value):
    with pytest.raises(threads.ThreadConfigError, match=r"^Expected `PROSMIN_BENCH_THREADS` to be a positive "
                       rf"integer, but got '{value}'$"):
        threads.resolve_threads(None, environ={"PROSMIN_BENCH_THREADS": value})


def test_default_threads_share_the_cores_among_jobs():
    assert [threads.default_threads(j, cores=4) for j in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert threads.resolve_threads(None, jobs=2, environ={}) == (max(1, threads.usable_cores() // 2),
                                                                  "default")


def test_the_module_imports_without_torch():
    out = _run("import json, os, sys\nfrom prosmin_bench import threads\nthreads.prepare_environment()\n"
               "threads.resolve_threads(None)\n"
               "print(json.dumps({'torch': 'torch' in sys.modules, 'policy': os.environ['OMP_WAIT_POLICY']}))")
    assert out == {"torch": False, "policy": "PASSIVE"}
