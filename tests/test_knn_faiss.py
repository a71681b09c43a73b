"""The faiss k-NN backend (``--knn-backend faiss``, tasks/knn_faiss.py): the torch backend's neighbours and votes, a
brute-force numpy reference, blocking under small budgets, the GPU dispatch, the missing-faiss error and the CLI end
to end (run_config, reuse)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from prosmin_bench.cli import main
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.paths import record_path
from prosmin_bench.results import ResultRecord, read_record
from prosmin_bench.tasks.knn import knn_plan, knn_predict, knn_topk

faiss = pytest.importorskip("faiss")

INSTALL = "pip install 'prosmin-bench[faiss]'"


def _data(n_train: int = 1500, n_test: int = 200, dim: int = 24, classes: int = 7, seed: int = 0):
    """Continuous random features with labels, without the queries whose 100 nearest similarities (float64) come
    within 1e-6 of each other: float32 rounding (about 1e-7 here) may order those either way, in either backend."""
    rng = np.random.default_rng(seed)
    xtr = rng.standard_normal((n_train, dim)).astype(np.float32)
    xte = rng.standard_normal((n_test, dim)).astype(np.float32)
    sims, _ = _brute_force(xtr, xte, min(101, n_train))
    untied = (-np.diff(sims, axis=1) > 1e-6).all(axis=1)
    assert untied.mean() > 0.5
    return xtr, rng.integers(0, classes, n_train), xte[untied]


def _brute_force(xtr: np.ndarray, xte: np.ndarray, k: int, exclude: np.ndarray | None = None):
    """Cosine top-k by a float64 similarity matrix and a stable argsort (the independent reference)."""
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte / np.linalg.norm(xte, axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.astype(np.float64).T
    if exclude is not None:
        sims[:, exclude] = -np.inf
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, idx, 1), idx


def _exclude(n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[::4] = True
    mask[:1200] = True  # under the small budget the whole first bank chunk (asserted below)
    return mask


# 1 GiB: the whole bank in one index; 600 kB: several bank chunks and query blocks (asserted below)
@pytest.mark.parametrize("budget", [1 << 30, 600_000])
@pytest.mark.parametrize("excluded", [False, True])
def test_faiss_neighbours_equal_torch_and_brute_force(budget, excluded):
    xtr, _, xte = _data()
    k = 20
    exclude = _exclude(len(xtr)) if excluded else None
    plan = knn_plan(xtr, xte, k, max_memory=budget, exclude=exclude, backend="faiss")
    assert plan.path == "faiss_cpu" and plan.bytes <= budget
    if budget < 1 << 20:
        assert plan.bank_chunk < len(xtr) and plan.query_chunk < len(xte)
        assert not excluded or exclude[: plan.bank_chunk].all()
    sims, idx = knn_topk(xtr, xte, k, max_memory=budget, exclude=exclude, backend="faiss")
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64 and sims.shape == idx.shape == (len(xte), k)
    t_sims, t_idx = knn_topk(xtr, xte, k, max_memory=budget, exclude=exclude)
    assert torch.equal(idx, t_idx)
    np.testing.assert_allclose(sims.numpy(), t_sims.numpy(), rtol=0, atol=1e-5)
    ref_sims, ref_idx = _brute_force(xtr, xte, k, exclude)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-5)


def test_faiss_knn_predict_equals_torch_and_the_direct_vote():
    xtr, ytr, xte = _data(seed=1)
    for budget in (1 << 30, 1_000_000):
        probs = knn_predict(xtr, ytr, xte, k=20, temperature=0.07, num_classes=7, max_memory=budget,
                            backend="faiss")
        torch_probs = knn_predict(xtr, ytr, xte, k=20, temperature=0.07, num_classes=7, max_memory=budget)
        np.testing.assert_allclose(probs.numpy(), torch_probs.numpy(), rtol=0, atol=1e-5)
        assert torch.equal(probs.argmax(1), torch_probs.argmax(1))
    sims, idx = _brute_force(xtr, xte, 20)  # DINO eval_knn.py: votes exp(sim / T) per class, normalised
    votes = np.zeros((len(xte), 7))
    np.add.at(votes, (np.arange(len(xte))[:, None], ytr[idx]), np.exp(sims / 0.07))
    np.testing.assert_allclose(probs.numpy(), votes / votes.sum(1, keepdims=True), rtol=0, atol=1e-4)


def test_faiss_reads_a_float16_memmap_bank_and_keeps_k_above_the_bank(tmp_path):
    xtr, _, xte = _data(n_train=300, n_test=50)
    np.save(tmp_path / "bank.npy", xtr.astype(np.float16))
    bank = np.load(tmp_path / "bank.npy", mmap_mode="r")
    sims, idx = knn_topk(bank, xte, 20, max_memory=200_000, backend="faiss")
    ref_sims, ref_idx = _brute_force(np.asarray(bank, dtype=np.float32), xte, 20)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-5)
    sims, idx = knn_topk(xtr[:5], xte, 20, backend="faiss")  # k above the bank: all of it, like torch
    assert idx.shape == (len(xte), 5) and sorted(idx[0].tolist()) == list(range(5))


def test_faiss_budget_and_argument_errors():
    xtr, _, xte = _data(n_train=300, n_test=50)
    with pytest.raises(ProsminBenchError, match="raise --max-memory"):
        knn_topk(xtr, xte, 20, max_memory=10_000, backend="faiss")
    with pytest.raises(ProsminBenchError, match="`path` to be None with the faiss backend"):
        knn_topk(xtr, xte, 20, path="dense", backend="faiss")
    with pytest.raises(ProsminBenchError, match="`backend` to be one of"):
        knn_topk(xtr, xte, 20, backend="annoy")
    with pytest.raises(ProsminBenchError, match="same width"):
        knn_topk(xtr, xte[:, :3], 20, backend="faiss")


def test_the_gpu_index_is_used_on_cuda_when_faiss_has_gpu_support(monkeypatch):
    """A stand-in faiss with GPU classes (their index a CPU IndexFlatIP): a CUDA device takes the GPU index on its
    device, with bounded temporary and no pinned memory; a CPU device, or faiss-cpu, the CPU index."""
    made: dict = {"devices": [], "temp": [], "pinned": []}

    class Resources:
        def setTempMemory(self, n):  # noqa: N802 (faiss's names)
            made["temp"].append(n)

        def setPinnedMemory(self, n):  # noqa: N802
            made["pinned"].append(n)

    def gpu_index(res, dim, config):
        made["devices"].append(config.device)
        return faiss.IndexFlatIP(dim)

    fake = types.SimpleNamespace(cvar=faiss.cvar, IndexFlatIP=faiss.IndexFlatIP, get_num_gpus=lambda: 2,
                                 StandardGpuResources=Resources, GpuIndexFlatConfig=types.SimpleNamespace,
                                 GpuIndexFlatIP=gpu_index)
    xtr, _, xte = _data(n_train=2000, n_test=100)
    assert knn_plan(xtr, xte, 10, device="cuda:1", backend="faiss").path == "faiss_cpu"  # the real faiss-cpu
    monkeypatch.setitem(sys.modules, "faiss", fake)
    budget = 4_000_000
    assert knn_plan(xtr, xte, 10, device="cpu", backend="faiss").path == "faiss_cpu"
    plan = knn_plan(xtr, xte, 10, device="cuda:1", max_memory=budget, backend="faiss")
    assert plan.path == "faiss_gpu" and plan.bytes <= budget
    sims, idx = knn_topk(xtr, xte, 10, device="cuda:1", max_memory=budget, backend="faiss")
    assert made["devices"] and set(made["devices"]) == {1} and made["pinned"] == [0]
    assert 0 < made["temp"][0] <= budget
    ref_sims, ref_idx = _brute_force(xtr, xte, 10)
    np.testing.assert_array_equal(idx.numpy(), ref_idx)
    np.testing.assert_allclose(sims.numpy(), ref_sims, rtol=0, atol=1e-5)


def test_missing_faiss_is_a_one_line_error_before_any_work(monkeypatch, tmp_path, capsys):
    from prosmin_bench.runner import RunOptions
    from prosmin_bench.settings import EvalSettings

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ModuleNotFoundError
    xtr, _, xte = _data(n_train=100, n_test=10)
    with pytest.raises(ProsminBenchError, match=INSTALL.replace("[", r"\[").replace("]", r"\]")) as info:
        knn_topk(xtr, xte, 5, backend="faiss")
    assert "\n" not in str(info.value)
    knn_topk(xtr, xte, 5)  # the torch backend needs no faiss
    for make in (lambda: RunOptions(knn_backend="faiss"), lambda: EvalSettings(knn_backend="faiss")):
        with pytest.raises(ProsminBenchError, match="needs faiss"):
            make()
    res = tmp_path / "res"
    code = main(["run", "--model", "random_micro", "--task", "digits_knn", "--knn-backend", "faiss",
                 "--results", str(res)])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and INSTALL in err and "Traceback" not in err, err
    assert not res.exists() or not any(res.rglob("*.json"))


def test_knn_backend_setting_is_checked():
    from prosmin_bench.runner import RunOptions
    from prosmin_bench.settings import EvalSettings

    for make in (lambda: RunOptions(knn_backend="annoy"), lambda: EvalSettings(knn_backend="annoy")):
        with pytest.raises(ProsminBenchError, match="`knn_backend` to be one of"):
            make()
    with pytest.raises(SystemExit):
        main(["run", "--knn-backend", "annoy"])


def test_cli_knn_backend_end_to_end(tmp_path, capsys):
    """digits_knn with random_micro: the faiss record has the torch record's numbers, says faiss in run_config and
    its search plan, and is not reused by a torch run (nor the torch record by a faiss run)."""
    res = tmp_path / "res"
    run = ["run", "--model", "random_micro", "--task", "digits_knn", "--seeds", "0", "--results", str(res)]
    path = record_path(res, "random_micro", "digits_knn")
    assert main([*run, "--knn-backend", "faiss"]) == 0, capsys.readouterr().err
    faiss_rec = read_record(path)
    assert isinstance(faiss_rec, ResultRecord)
    assert faiss_rec.run_config["knn_backend"] == "faiss" and faiss_rec.extras["search"]["path"] == "faiss_cpu"
    capsys.readouterr()
    assert main(run) == 0
    err = capsys.readouterr().err
    assert "up to date" not in err and "recomputing with" in err, err
    torch_rec = read_record(path)
    assert torch_rec.run_config["knn_backend"] == "torch" and torch_rec.extras["search"]["path"] == "dense"
    assert faiss_rec.mean.keys() == torch_rec.mean.keys()  # every k, with the held-out temperature scaling
    # random_micro's digit features are nearly parallel (cosines about 0.999, thousands of neighbour pairs within
    # 1e-6): the two backends' float32 roundings (up to 5e-7 apart here) order such near-ties differently, so a
    # neighbour at the k-th place may differ; the top-1 does not, and the other numbers move by at most 2e-3
    for name, value in torch_rec.mean.items():
        if name.startswith("top1"):
            assert faiss_rec.mean[name] == value, name
        else:
            assert faiss_rec.mean[name] == pytest.approx(value, rel=1e-3, abs=5e-3), name
    assert main(run) == 0 and "up to date" in capsys.readouterr().err  # same backend again: reused


def test_faiss_measured_peak_memory_stays_under_the_budget(tmp_path):
    """A 200k x 64 float16 memmap bank under a 24 MiB budget, with enough queries for faiss's 16 MiB BLAS block:
    peak RSS growth measured, not estimated (as tests/test_knn.py does for the torch backend)."""
    rng = np.random.default_rng(7)
    n, dim, n_test, k = 200_000, 64, 2100, 20
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, 50_000):
        bank[s : s + 50_000] = rng.standard_normal((50_000, dim), dtype=np.float32)
    bank.flush()
    del bank
    bank = np.load(tmp_path / "bank.npy", mmap_mode="r")
    test = rng.standard_normal((n_test, dim), dtype=np.float32)
    budget = 24 << 20
    plan = knn_plan(bank, test, k, max_memory=budget, backend="faiss")
    assert plan.bank_chunk < n and plan.query_chunk * dim >= faiss.cvar.distance_compute_blas_threshold
    knn_topk(bank[:1000], test[:2], 2, max_memory=budget, backend="faiss")  # first-call allocations
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM) of this process
    except OSError:
        pytest.skip("cannot reset the peak RSS counter here (/proc/self/clear_refs)")

    def peak_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))

    before = peak_kib()
    sims, idx = knn_topk(bank, test, k, max_memory=budget, backend="faiss")
    grown = (peak_kib() - before) * 1024
    print(f"peak RSS growth {grown / 2**20:.1f} MiB of {budget / 2**20:.0f} MiB ({plan})")
    assert grown <= budget, f"peak RSS grew by {grown / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    ref_sims, _ = _brute_force(np.asarray(bank[:], dtype=np.float32), test[:5], k)  # spot check
    np.testing.assert_allclose(sims[:5].numpy(), ref_sims, rtol=0, atol=1e-5)
