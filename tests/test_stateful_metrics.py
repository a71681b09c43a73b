"""Issue 22: the torchmetrics classes of ``prosmin_bench.metrics.stateful`` equal the functional metrics on the
concatenated data, however the rows are split into batches, and under a real 2-process gloo sync.

References: the functional metrics (SVD-based RankMe, sort-based OOD metrics), scikit-learn's ROC AUC and average
precision, and direct numpy formulas for the per-dimension std and the corruption errors.
"""

from __future__ import annotations

import json
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import average_precision_score, roc_auc_score

import prosmin_bench.metrics as M
from prosmin_bench.metrics import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, CORRUPTIONS, MetricArgumentError
from prosmin_bench.metrics.stateful import CorruptionError, EffectiveRank, OODMetrics, PerDimStd
from prosmin_bench.pretrain.monitor import batch_collapse_stats


def _features(name: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, name)))
    if name == "random":
        return rng.normal(size=(100, 12))
    if name == "wide":  # N < D: at most N - 1 non-zero singular values after centring
        return rng.normal(size=(9, 40))
    if name == "offset":  # a large common mean, one scale per dimension
        return rng.normal(size=(64, 20)) @ np.diag(np.linspace(2.0, 0.01, 20)) + 50.0
    if name == "far":  # a common mean 1e7 times the smallest spread: raw sums of x x^T would lose 14 digits
        return rng.normal(size=(300, 24)) @ np.diag(np.logspace(0, -3, 24)) + 1e4
    if name == "rank3":
        return rng.normal(size=(80, 3)) @ rng.normal(size=(3, 16)) + 1.0
    if name == "identical":  # every row the same point: rank 0
        return np.tile(rng.normal(size=(1, 5)), (7, 1))
    if name == "two_rows":
        return rng.normal(size=(2, 4))
    raise KeyError(name)


def _ref_rankme(x: np.ndarray) -> float:
    """Garrido et al. Eq. 1 on the centred data, singular values at rounding level dropped (direct numpy)."""
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    s = s[s > 1e-9 * np.linalg.norm(x)]
    if s.size == 0:
        return 0.0
    p = s / s.sum() + 1e-7
    zeros = min(x.shape) - s.size  # each zero singular value adds p = 1e-7 to the entropy
    return float(np.exp(-np.sum(p * np.log(p)) - zeros * 1e-7 * np.log(1e-7)))


def _batches(x: np.ndarray, splits: str) -> list[np.ndarray]:
    n = x.shape[0]
    cuts = {"one": [], "three": [n // 3, 2 * n // 3], "ragged": [1, 1, n // 2]}[splits]  # "ragged" has an empty batch
    return np.split(x, cuts)


@pytest.mark.parametrize("splits", ["one", "three", "ragged"])
@pytest.mark.parametrize("name", ["random", "wide", "offset", "far", "rank3", "identical", "two_rows"])
def test_effective_rank_and_per_dim_std_equal_the_functional_metrics(name: str, splits: str) -> None:
    x = _features(name)
    rank, spread = EffectiveRank(x.shape[1]), PerDimStd(x.shape[1])
    for part in _batches(x, splits):
        rank.update(torch.from_numpy(part))
        spread.update(part.astype(np.float32) if name == "random" else part)  # any real dtype, tensor or array
    got = rank.compute()
    assert got.dtype == torch.float64 and got.ndim == 0
    assert got.item() == pytest.approx(M.effective_rank(x), rel=1e-9, abs=1e-12)
    assert got.item() == pytest.approx(_ref_rankme(x), rel=1e-6, abs=1e-12)
    xs = x.astype(np.float32).astype(np.float64) if name == "random" else x
    z = xs / np.linalg.norm(xs, axis=1, keepdims=True)
    assert spread.compute().item() == pytest.approx(z.std(axis=0).mean(), rel=1e-9, abs=1e-15)
    assert spread.compute().item() == pytest.approx(M.per_dim_std(xs), rel=1e-9, abs=1e-15)


def test_effective_rank_forward_reset_and_low_precision_inputs() -> None:
    x = torch.from_numpy(_features("rank3")).to(torch.bfloat16)
    m = EffectiveRank(16)
    first = m(x[:40])  # forward: this batch's value, and the batch merged into the state
    assert first.item() == pytest.approx(M.effective_rank(x[:40].double().numpy()), rel=1e-9)
    m.update(x[40:])
    assert m.compute().item() == pytest.approx(M.effective_rank(x.double().numpy()), rel=1e-9)
    m.reset()
    m.update(torch.eye(16))
    assert m.compute().item() == pytest.approx(_ref_rankme(np.eye(16)), rel=1e-9)  # 15 equal directions


def _ood_data(n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    is_ood = rng.random(n) < 0.4
    conf = np.round(rng.normal(size=n) - 0.8 * is_ood, 1)  # rounded: many ties, within and across the classes
    return conf, is_ood


@pytest.mark.parametrize("splits", [1, 4, 9])
def test_ood_metrics_equal_the_functional_metrics_and_sklearn(splits: int) -> None:
    conf, is_ood = _ood_data()
    m = OODMetrics()
    for c, o in zip(np.array_split(conf, splits), np.array_split(is_ood, splits)):
        m.update(torch.from_numpy(c).float(), torch.from_numpy(o).long() if splits == 4 else o)
    got = {k: v.item() for k, v in m.compute().items()}
    want = M.ood_metrics(conf[~is_ood], conf[is_ood])
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], abs=1e-6) for k in want)
    c32 = conf.astype(np.float32).astype(np.float64)  # what the float32 batches carried
    assert got["auroc"] == pytest.approx(roc_auc_score(is_ood, -c32), abs=1e-12)
    assert got["aupr_out"] == pytest.approx(average_precision_score(is_ood, -c32), abs=1e-12)
    assert got["aupr_in"] == pytest.approx(average_precision_score(~is_ood, c32), abs=1e-12)
    id_sorted = np.sort(c32[~is_ood])[::-1]
    threshold = id_sorted[int(np.ceil(0.95 * id_sorted.size)) - 1]  # keeps at least 95% of ID samples
    assert got["fpr95"] == pytest.approx(np.mean(c32[is_ood] >= threshold), abs=1e-12)


def _corruption_counts(seed: int = 0) -> dict:
    """Per (corruption, severity) and clean: predicted and true labels of a 4-class problem, ~30-70% wrong."""
    rng = np.random.default_rng(seed)
    cells = {}
    for c in [*CORRUPTIONS, "clean"]:
        for s in ([None] if c == "clean" else range(1, 6)):
            n = int(rng.integers(6, 20))
            target = rng.integers(0, 4, size=n)
            logits = rng.normal(size=(n, 4))
            logits[np.arange(n), target] += rng.uniform(0.0, 2.0)
            cells[(c, s)] = (logits, target)
    return cells


def _direct_corruption_metrics(cells: dict) -> dict[str, float]:
    err = {k: float(np.mean(v[0].argmax(1) != v[1])) for k, v in cells.items()}
    clean = err[("clean", None)]
    out = {"clean_error": clean}
    for c in CORRUPTIONS:
        e = np.array([err[(c, s)] for s in range(1, 6)])
        out[f"ce_{c}"] = e.sum() / np.sum(ALEXNET_ERRORS[c])
        out[f"relative_ce_{c}"] = (e - clean).sum() / np.sum(np.array(ALEXNET_ERRORS[c]) - ALEXNET_CLEAN_ERROR)
        out.update({f"error_{c}_s{s}": e[s - 1] for s in range(1, 6)})
    out["mce"] = 100 * np.mean([out[f"ce_{c}"] for c in CORRUPTIONS])
    out["relative_mce"] = 100 * np.mean([out[f"relative_ce_{c}"] for c in CORRUPTIONS])
    return out


def test_corruption_error_equals_the_direct_formula_over_batches() -> None:
    cells = _corruption_counts()
    m = CorruptionError()
    for (c, s), (logits, target) in cells.items():
        half = logits.shape[0] // 2  # two batches per cell: scores for one, predicted labels for the other
        m.update(torch.from_numpy(logits[:half]).float(), torch.from_numpy(target[:half]), c, s)
        m.update(logits[half:].argmax(1), target[half:], c, s)
    got = {k: v.item() for k, v in m.compute().items()}
    want = _direct_corruption_metrics(cells)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)
    errors = {c: [want[f"error_{c}_s{s}"] for s in range(1, 6)] for c in CORRUPTIONS}
    assert got["mce"] == pytest.approx(M.mean_corruption_error(errors), rel=1e-12)
    relative = M.relative_mean_corruption_error(errors, want["clean_error"])
    assert got["relative_mce"] == pytest.approx(relative, rel=1e-12)
    flat = {c: [0.5] * 5 for c in CORRUPTIONS}  # a mapping baseline with its clean error
    own = CorruptionError(baseline=flat, baseline_clean_error=0.25)
    for (c, s), (logits, target) in cells.items():
        own.update(torch.from_numpy(logits), torch.from_numpy(target), c, s)
    assert own.compute()["mce"].item() == pytest.approx(100 * np.mean([np.mean(errors[c]) / 0.5 for c in CORRUPTIONS]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # torchmetrics: compute before update
def test_argument_errors_say_what_was_expected() -> None:
    checks = [
        (lambda: EffectiveRank(0), "`num_features` to be a positive integer"),
        (lambda: EffectiveRank(3).update(torch.zeros(4, 2)), "num_features=3 columns"),
        (lambda: EffectiveRank(3).update(torch.zeros(4)), "`features` to be 2-dimensional"),
        (lambda: EffectiveRank(2).update(torch.tensor([[0.0, float("nan")]])), "finite"),
        (lambda: EffectiveRank(2).update(torch.zeros(2, 2, dtype=torch.complex64)), "real numbers"),
        (lambda: EffectiveRank(2).compute(), "at least 2 rows"),
        (lambda: PerDimStd(2).compute(), "at least 2 rows"),
        (lambda: OODMetrics().update(torch.zeros(3), torch.zeros(2, dtype=torch.bool)), "`is_ood` to have shape (3,)"),
        (lambda: OODMetrics().update(torch.zeros(2), torch.tensor([0, 2])), "values in [0, 2]"),
        (lambda: OODMetrics().update(torch.zeros(2), torch.tensor([0.0, 1.0])), "bool or integers 0/1"),
        (lambda: OODMetrics().compute(), "at least one ID and one OOD sample, but got 0 ID and 0 OOD"),
        (lambda: CorruptionError().update([0], [0], "fgsm", 1), "one of the 15 ImageNet-C corruptions"),
        (lambda: CorruptionError().update([0], [0], "fog", 6), "`severity` to be an integer in [1, 5]"),
        (lambda: CorruptionError().update([0], [0], "clean", 1), "`severity` to be None"),
        (lambda: CorruptionError().update([0, 1], [0], "fog", 1), "one label per prediction (2), but got 1"),
        (lambda: CorruptionError().update([0.5], [0], "fog", 1), "`preds` to be integer class indices"),
        (lambda: CorruptionError().compute(), "no samples for 75 of 75: gaussian_noise s1"),
        (lambda: CorruptionError(baseline="resnet"), "'alexnet' or a mapping"),
        (lambda: CorruptionError(baseline={c: [0.5] * 5 for c in CORRUPTIONS}).update([0], [0], "clean"),
         "`baseline_clean_error` to be given"),
    ]
    for call, message in checks:
        with pytest.raises(MetricArgumentError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    m = OODMetrics()
    m.update([0.3, 0.2], [True, True])
    with pytest.raises(MetricArgumentError, match="but got 0 ID and 2 OOD"):
        m.compute()


def test_the_package_attribute_and_the_monitor_use_the_stateful_module(monkeypatch) -> None:
    assert M.stateful.EffectiveRank is EffectiveRank  # the lazy attribute of prosmin_bench.metrics
    updates = []
    original = EffectiveRank.update
    monkeypatch.setattr(EffectiveRank, "update", lambda self, x: updates.append(x.shape) or original(self, x))
    x = _features("rank3")  # [80, 16] of rank 3
    for batch in (x[:64], x[:12]):  # tall: the streamed covariance; wide (12 rows, 16 columns): the batch's SVD
        stats = batch_collapse_stats(torch.from_numpy(batch))
        assert stats["effective_rank"] == pytest.approx(_ref_rankme(batch), rel=1e-6)
    assert updates == [(64, 16)]


# ------------------------------------------------------------------------------- 2 processes, gloo
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The ``compute`` method of metric")  # the metrics rank 1 never fed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # a lost peer fails the test instead of hanging it
    try:
        x = _features("offset")
        rows = x[:25] if rank == 0 else x[25:]  # uneven halves
        rank_m, spread = EffectiveRank(x.shape[1]), PerDimStd(x.shape[1])
        rank_m.update(torch.from_numpy(rows[:10]))
        rank_m.update(torch.from_numpy(rows[10:]))
        rank_rank0_only = EffectiveRank(x.shape[1])
        if rank == 0:  # rank 1 keeps the empty default state
            rank_rank0_only.update(torch.from_numpy(x))
        spread.update(torch.from_numpy(rows))
        conf, is_ood = _ood_data()
        part = slice(0, 50) if rank == 0 else slice(50, None)
        ood, ood_rank0_only = OODMetrics(), OODMetrics()
        ood.update(torch.from_numpy(conf[part]), torch.from_numpy(is_ood[part]))
        if rank == 0:  # rank 1 sees no data at all: it contributes an empty list state
            ood_rank0_only.update(torch.from_numpy(conf), torch.from_numpy(is_ood))
        corr = CorruptionError()
        for (c, s), (logits, target) in _corruption_counts().items():
            cut = logits.shape[0] // 2
            sl = slice(0, cut) if rank == 0 else slice(cut, None)
            corr.update(torch.from_numpy(logits[sl]), torch.from_numpy(target[sl]), c, s)
        result = {
            "effective_rank": rank_m.compute().item(), "per_dim_std": spread.compute().item(),
            "effective_rank_rank0_only": rank_rank0_only.compute().item(),
            "ood": {k: v.item() for k, v in ood.compute().items()},
            "ood_rank0_only": {k: v.item() for k, v in ood_rank0_only.compute().items()},
            "corruption": {k: v.item() for k, v in corr.compute().items()},
            "local_count": int(rank_m.moments[0, 0]),  # compute() synced a copy; the local state is back
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync_equals_the_functional_metrics_on_all_data(tmp_path: Path) -> None:
    # Forked where the platform allows: the children inherit the imported torch and torchmetrics (importing them
    # again in each spawned child took 5 to 15 s of this test's time on 2 busy cores).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method=method)
    x = _features("offset")
    conf, is_ood = _ood_data()
    want_ood = M.ood_metrics(conf[~is_ood], conf[is_ood])
    want_corr = _direct_corruption_metrics(_corruption_counts())
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("effective_rank", "effective_rank_rank0_only"):
            assert got[key] == pytest.approx(M.effective_rank(x), rel=1e-9), key
        assert got["per_dim_std"] == pytest.approx(M.per_dim_std(x), rel=1e-9)
        for key in ("ood", "ood_rank0_only"):
            assert got[key] == pytest.approx(want_ood, abs=1e-12), key
        assert got["corruption"] == pytest.approx(want_corr, rel=1e-12)
        assert got["local_count"] == (25 if rank == 0 else x.shape[0] - 25)
