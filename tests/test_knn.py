"""k-NN (DINO weighted vote) against a direct dense implementation written here and scikit-learn's exact neighbours,
the dense and streaming searches (forced, and chosen by the memory budget), chunked against unchunked, tiny memory
budgets, fewer than 100 test images, k > N_train, memory-mapped banks and a measured memory bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prosmin_bench.errors import FeatureError
from prosmin_bench.tasks.knn import _RESULT_BYTES_PER_K, _chunk_sizes, _working_bytes, knn_plan, knn_predict, knn_topk


def dense_knn_probs(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, temperature: float,
                    num_classes: int) -> np.ndarray:
    """DINO eval_knn.py written out directly in float64: cosine similarity to every train sample, the k largest,
    weights exp(sim / T), votes summed per class, normalised to sum 1."""
    tr = train.astype(np.float64)
    te = test.astype(np.float64)
    tr = tr / np.maximum(np.linalg.norm(tr, axis=1, keepdims=True), 1e-12)
    te = te / np.maximum(np.linalg.norm(te, axis=1, keepdims=True), 1e-12)
    k = min(k, len(tr))
    out = np.zeros((len(te), num_classes))
    for r, q in enumerate(te):
        sims = tr @ q
        top = np.argsort(-sims, kind="stable")[:k]
        for j in top:
            out[r, labels[j]] += np.exp(sims[j] / temperature)
        out[r] /= out[r].sum()
    return out


def clustered(n_train: int, n_test: int, dim: int, classes: int, seed: int = 0):
    """Noisy class clusters, so votes are neither uniform nor one-hot."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ytr = rng.integers(0, classes, n_train)
    yte = rng.integers(0, classes, n_test)
    xtr = (centres[ytr] + 1.5 * rng.normal(size=(n_train, dim))).astype(np.float32)
    xte = (centres[yte] + 1.5 * rng.normal(size=(n_test, dim))).astype(np.float32)
    return xtr, ytr, xte, yte


def assert_same_neighbours(train, test, sims, idx):
    """Similarities equal those of a dense top-k over the whole similarity matrix, and each index points at a
    train row with that similarity (exact float ties may be ordered either way)."""
    tr = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train, dtype=np.float32)), dim=1)
    te = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test, dtype=np.float32)), dim=1)
    ref_sims = (te @ tr.T).topk(sims.shape[1], dim=1).values
    torch.testing.assert_close(sims, ref_sims, rtol=0, atol=1e-6)
    pointed = (te.unsqueeze(1) * tr[idx]).sum(-1)
    torch.testing.assert_close(pointed, sims, rtol=0, atol=1e-5)
    assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)  # no neighbour counted twice


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5)])
def test_knn_predict_matches_direct_dense_implementation(k, temperature):
    xtr, ytr, xte, _ = clustered(400, 60, 16, 5)
    probs = knn_predict(xtr, ytr, xte, k=k, temperature=temperature, num_classes=5)
    ref = dense_knn_probs(xtr, ytr, xte, k, temperature, 5)
    assert probs.shape == (60, 5) and probs.dtype == torch.float32
    np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_chunked_equals_unchunked_and_the_plan_really_chunks():
    n_train, n_test, dim, k = 3000, 60, 24, 30
    xtr, ytr, xte, _ = clustered(n_train, n_test, dim, 7, seed=1)
    result = _RESULT_BYTES_PER_K * k * n_test
    assert _chunk_sizes(n_test, n_train, k, (1 << 30) - result, 4, dim=dim) == (n_test, n_train)
    ref_probs = knn_predict(xtr, ytr, xte, k=k, num_classes=7, max_memory=1 << 30)
    np.testing.assert_allclose(ref_probs.numpy(), dense_knn_probs(xtr, ytr, xte, k, 0.07, 7), rtol=1e-4, atol=1e-6)
    vote_bytes = 4 * n_test * 7 + n_test * (8 * 7 + 28 * k)
    plans = []
    for budget in (result + 900_000, result + 60_000):
        q, b = _chunk_sizes(n_test, n_train, k, budget - result, 4, dim=dim)
        plans.append((q, b))
        assert q < n_test and b < n_train, (budget, q, b)  # several query chunks and several bank chunks
        assert _working_bytes(q, b, dim, k, 4) + result <= budget
        sims, idx = knn_topk(xtr, xte, k, max_memory=budget, path="stream")
        assert_same_neighbours(xtr, xte, sims, idx)
        probs = knn_predict(xtr, ytr, xte, k=k, num_classes=7, max_memory=budget + vote_bytes, path="stream")
        torch.testing.assert_close(probs, ref_probs, rtol=1e-5, atol=1e-6)
    assert plans[0][0] > 1 and plans[1][0] == 1  # many queries per chunk, then one


def test_class_sorted_bank_takes_the_heavy_row_path_and_stays_exact(monkeypatch):
    """A bank sorted by class (as ImageFolder lists ImageNet): when a query's own class arrives, more than k of
    its rows beat the running k-th best at once."""
    from prosmin_bench.tasks import knn_search

    rng = np.random.default_rng(7)
    classes, per_class, dim, k = 200, 25, 16, 20
    centres = rng.normal(size=(classes, dim))
    ytr = np.repeat(np.arange(classes), per_class)
    xtr = (centres[ytr] + 0.05 * rng.normal(size=(len(ytr), dim))).astype(np.float32)
    xte = (centres + 0.05 * rng.normal(size=(classes, dim))).astype(np.float32)
    calls = []
    real = knn_search._merge_heavy
    monkeypatch.setattr(knn_search, "_merge_heavy", lambda *a: (calls.append(len(a[3])), real(*a)))
    budget = 3_100_000
    q, b = _chunk_sizes(classes, len(ytr), k, budget - _RESULT_BYTES_PER_K * k * classes, 4, dim=dim)
    assert q == classes and b < len(ytr)
    sims, idx = knn_topk(xtr, xte, k, max_memory=budget, path="stream")  # this budget also fits the dense path
    assert sum(calls) > 0  # rows with more than k candidates in one block were merged by their own top-k
    assert_same_neighbours(xtr, xte, sims, idx)
    np.testing.assert_allclose(knn_predict(xtr, ytr, xte, k=k, max_memory=budget + (1 << 20), path="stream").numpy(),
                               dense_knn_probs(xtr, ytr, xte, k, 0.07, classes), rtol=1e-4, atol=1e-6)


def test_smallest_budget_one_query_one_bank_row_and_below_it_an_error():
    xtr, ytr, xte, _ = clustered(50, 9, 8, 3, seed=2)
    k = 4
    floor = _RESULT_BYTES_PER_K * k * 9 + _working_bytes(1, 1, 8, k, 4)
    assert _chunk_sizes(9, 50, k, floor - _RESULT_BYTES_PER_K * k * 9, 4, dim=8) == (1, 1)
    sims, idx = knn_topk(xtr, xte, k, max_memory=floor)
    assert_same_neighbours(xtr, xte, sims, idx)
    with pytest.raises(FeatureError, match="memory budget of at least"):
        knn_topk(xtr, xte, k, max_memory=floor - 1)


@pytest.mark.parametrize("n_test", [1, 7, 99])
def test_fewer_than_100_test_images(n_test):
    xtr, ytr, xte, _ = clustered(300, n_test, 12, 4, seed=3)
    probs = knn_predict(xtr, ytr, xte, k=20, num_classes=4)
    np.testing.assert_allclose(probs.numpy(), dense_knn_probs(xtr, ytr, xte, 20, 0.07, 4), rtol=1e-4, atol=1e-6)


def test_k_larger_than_the_train_set_uses_every_train_sample():
    xtr, ytr, xte, _ = clustered(5, 11, 6, 3, seed=4)
    sims, idx = knn_topk(xtr, xte, 20)
    assert sims.shape == idx.shape == (11, 5)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3, 4]
    probs = knn_predict(xtr, ytr, xte, k=20, num_classes=3)
    np.testing.assert_allclose(probs.numpy(), dense_knn_probs(xtr, ytr, xte, 5, 0.07, 3), rtol=1e-4, atol=1e-6)


def test_memory_mapped_float16_bank_gives_the_in_memory_result(tmp_path):
    xtr, ytr, xte, _ = clustered(2500, 40, 16, 5, seed=5)
    path = tmp_path / "bank.npy"
    np.save(path, xtr.astype(np.float16))
    bank = np.load(path, mmap_mode="r")
    result = _RESULT_BYTES_PER_K * 10 * 40
    probs = knn_predict(bank, ytr, xte, k=10, num_classes=5, max_memory=result + 40_000 + 4 * 40 * 5 + 40 * 400)
    ref = dense_knn_probs(xtr.astype(np.float16), ytr, xte, 10, 0.07, 5)
    np.testing.assert_allclose(probs.numpy(), ref, rtol=1e-4, atol=1e-6)
    torch_probs = knn_predict(torch.from_numpy(xtr.astype(np.float16)), torch.from_numpy(ytr), xte, k=10, num_classes=5)
    torch.testing.assert_close(probs, torch_probs)


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak resident set size (VmHWM) of this process
        return True
    except OSError:
        return False


def test_measured_peak_memory_stays_under_the_budget(tmp_path):
    """A 400k x 64 float16 bank (51 MB on disk) under a 24 MiB budget: peak RSS growth measured, not estimated."""
    rng = np.random.default_rng(6)
    n, dim, n_test, k = 400_000, 64, 500, 20
    bank = np.lib.format.open_memmap(tmp_path / "bank.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    for s in range(0, n, 50_000):
        bank[s : s + 50_000] = rng.standard_normal((50_000, dim), dtype=np.float32)
    bank.flush()
    del bank
    bank = np.load(tmp_path / "bank.npy", mmap_mode="r")
    test = rng.standard_normal((n_test, dim), dtype=np.float32)
    budget = 24 << 20
    knn_topk(bank[:1000], test[:2], 2, max_memory=budget)  # first-call allocations (thread pools, kernels)
    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak RSS counter here (/proc/self/clear_refs)")
    before_kib = _peak_rss_kib()
    sims, idx = knn_topk(bank, test, k, max_memory=budget)
    grown = (_peak_rss_kib() - before_kib) * 1024
    print(f"peak RSS growth {grown / 2**20:.1f} MiB of {budget / 2**20:.0f} MiB")
    assert grown <= budget, f"peak RSS grew by {grown / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    assert sims.shape == (n_test, k)
    # spot-check against the dense answer on a few queries
    tr = torch.nn.functional.normalize(torch.from_numpy(np.asarray(bank[:], dtype=np.float32)), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test[:5]), dim=1)
    ref_s, _ = (te @ tr.T).topk(k, dim=1)
    torch.testing.assert_close(sims[:5], ref_s, rtol=0, atol=1e-6)


def _sklearn_neighbours(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's exact brute-force cosine neighbours in float64: (similarities, indices) [N_test, k]."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train.astype(np.float64))
    dist, idx = nn.kneighbors(test.astype(np.float64))
    return 1.0 - dist, idx


@pytest.mark.parametrize("path", ["dense", "stream"])
def test_both_searches_give_sklearns_exact_neighbours_and_the_direct_vote(path):
    rng = np.random.default_rng(11)
    xtr, xte = rng.standard_normal((3000, 32), dtype=np.float32), rng.standard_normal((700, 32), dtype=np.float32)
    ytr = rng.integers(0, 10, 3000)
    k, budget = 200, 8 << 20
    plan = knn_plan(xtr, xte, k, max_memory=budget, path=path)
    assert plan.path == path and plan.query_chunk < 700  # several query chunks
    if path == "stream":
        assert plan.bank_chunk < 3000  # and several bank chunks
    sims, idx = knn_topk(xtr, xte, k, max_memory=budget, path=path)
    ref_s, ref_i = _sklearn_neighbours(xtr, xte, k + 1)
    np.testing.assert_allclose(sims.numpy(), ref_s[:, :k], rtol=0, atol=1e-5)
    # neighbour sets are exact wherever the k-th and (k+1)-th similarities are not within float32 rounding
    untied = ref_s[:, k - 1] - ref_s[:, k] > 1e-5
    assert untied.mean() > 0.9
    np.testing.assert_array_equal(np.sort(idx.numpy()[untied], 1), np.sort(ref_i[untied, :k], 1))
    probs = knn_predict(xtr, ytr, xte, k=k, num_classes=10, max_memory=budget + (1 << 20), path=path)
    ref = dense_knn_probs(xtr, ytr, xte, k, 0.07, 10)
    np.testing.assert_allclose(probs.numpy()[untied], ref[untied], rtol=1e-4, atol=1e-6)
    # an excluded part of the bank: the neighbours among the other rows, mapped back to bank indices
    exclude = rng.random(3000) < 0.25
    sims, idx = knn_topk(xtr, xte, k, max_memory=budget, path=path, exclude=exclude)
    kept = np.flatnonzero(~exclude)
    ref_s, ref_i = _sklearn_neighbours(xtr[kept], xte, k + 1)
    untied = ref_s[:, k - 1] - ref_s[:, k] > 1e-5
    np.testing.assert_allclose(sims.numpy(), ref_s[:, :k], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.sort(idx.numpy()[untied], 1), np.sort(kept[ref_i[untied, :k]], 1))


def test_the_search_path_follows_the_memory_budget(monkeypatch):
    """Dense exactly when the whole bank and a block of 64 queries x the bank fit (all queries when fewer), as the
    bytes are counted: normalised bank (read + float32 copies), query block, similarity block, top-k buffers."""
    from prosmin_bench.tasks import knn_search

    xtr, ytr, xte, _ = clustered(2000, 300, 16, 4, seed=12)
    k, threads = 20, torch.get_num_threads()
    result = 12 * k * 300  # float32 similarity + int64 index per query and neighbour
    bank_bytes = 2000 * (16 * (4 + 8) + 16 * threads)  # bank as read + float32 + normalised; top-k row copies
    per_query = 16 * (4 + 4) + 4 * 2000 + 12 * k  # query as read + normalised, similarity row, top-k output
    smallest = result + bank_bytes + 64 * per_query
    ran = []
    for name in ("_dense", "_stream"):
        real = getattr(knn_search, name)
        monkeypatch.setattr(knn_search, name, lambda *a, _n=name, _r=real: (ran.append(_n[1:]), _r(*a)))
    for budget, path, q in [(1 << 30, "dense", 300), (smallest + per_query - 1, "dense", 64),
                            (smallest, "dense", 64), (smallest - 1, "stream", None)]:
        plan = knn_plan(xtr, xte, k, max_memory=budget)
        assert plan.path == path and plan.bytes <= budget, (budget, plan)
        if q is not None:
            assert plan.query_chunk == q and plan.bank_chunk == 2000
            assert plan.bytes == result + bank_bytes + q * per_query
        ran.clear()
        sims, idx = knn_topk(xtr, xte, k, max_memory=budget)
        assert ran == [path]
        assert_same_neighbours(xtr, xte, sims, idx)
    few = xte[:10]  # fewer queries than a dense block's minimum: dense when they all fit
    assert knn_plan(xtr, few, k, max_memory=12 * k * 10 + bank_bytes + 10 * per_query).path == "dense"
    assert knn_plan(xtr, few, k, max_memory=12 * k * 10 + bank_bytes + 10 * per_query - 1).path == "stream"
    with pytest.raises(FeatureError, match="dense path"):
        knn_topk(xtr, xte, k, max_memory=smallest - 64 * per_query, path="dense")
    with pytest.raises(FeatureError, match="`path`"):
        knn_plan(xtr, xte, k, path="sparse")


def test_dense_search_measured_peak_memory_stays_under_the_budget():
    """The dense path's memory model, measured: a 100k x 64 float32 bank in RAM under a 128 MiB budget."""
    rng = np.random.default_rng(13)
    bank, test = rng.standard_normal((100_000, 64), dtype=np.float32), rng.standard_normal((500, 64), dtype=np.float32)
    budget, k = 128 << 20, 20
    plan = knn_plan(bank, test, k, max_memory=budget)
    assert plan.path == "dense" and plan.query_chunk < 500
    knn_topk(bank[:1000], test[:2], 2, max_memory=budget)  # first-call allocations (thread pools, kernels)
    if not _reset_peak_rss():
        pytest.skip("cannot reset the peak RSS counter here (/proc/self/clear_refs)")
    before_kib = _peak_rss_kib()
    sims, _ = knn_topk(bank, test, k, max_memory=budget)
    grown = (_peak_rss_kib() - before_kib) * 1024
    assert grown <= budget, f"peak RSS grew by {grown / 2**20:.1f} MiB, budget {budget / 2**20:.0f} MiB"
    tr = torch.nn.functional.normalize(torch.from_numpy(bank), dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test[:5]), dim=1)
    torch.testing.assert_close(sims[:5], (te @ tr.T).topk(k, dim=1).values, rtol=0, atol=1e-6)


def test_the_knn_task_records_its_search_plan():
    from types import SimpleNamespace

    from prosmin_bench.settings import EvalSettings
    from prosmin_bench.tasks import TaskContext, TaskSpec, build_task

    xtr, ytr, xte, yte = clustered(400, 50, 8, 3, seed=14)
    sets = {"train": SimpleNamespace(features=xtr, labels=ytr), "test": SimpleNamespace(features=xte, labels=yte)}
    spec = TaskSpec(name="plan_knn", kind="knn", version=1, main_score="top1_k20", suite="mini",
                    datasets={"train": "digits:train", "test": "digits:test"}, protocol={"ks": [20]})
    for budget, path in [(1 << 30, "dense"), (60_000, "stream")]:
        ctx = TaskContext(model=SimpleNamespace(spec=SimpleNamespace(feature_layer="cls")), seed=0,
                          settings=EvalSettings(max_memory=budget), dataset_fn=lambda ref: None,
                          feature_fn=lambda ref, layer, preprocess=None: sets[ref.split])
        out = build_task(spec).run(ctx)
        plan = knn_plan(xtr, xte, 20, max_memory=budget)
        assert out.extras["search"] == {"path": path, "query_chunk": plan.query_chunk, "bank_chunk": plan.bank_chunk}
        assert out.metrics["top1_k20"] == pytest.approx(
            float((dense_knn_probs(xtr, ytr, xte, 20, 0.07, 3).argmax(1) == yte).mean()))


def test_argument_errors():
    xtr, ytr, xte, _ = clustered(20, 3, 4, 2)
    with pytest.raises(FeatureError, match="`k`"):
        knn_predict(xtr, ytr, xte, k=0)
    with pytest.raises(FeatureError, match="temperature"):
        knn_predict(xtr, ytr, xte, temperature=0.0)
    with pytest.raises(FeatureError, match="same width"):
        knn_topk(xtr, xte[:, :3], 2)
    with pytest.raises(FeatureError, match="train labels"):
        knn_predict(xtr, ytr[:5], xte)
    with pytest.raises(FeatureError, match="non-empty"):
        knn_topk(xtr[:0], xte, 2)
    bad = xtr.copy()
    bad[7, 1] = np.nan
    with pytest.raises(FeatureError, match="NaN"):
        knn_topk(bad, xte, 2)
