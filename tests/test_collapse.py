"""Issue 7: the ``collapse`` task kind and the pretraining collapse monitor.

References are computed here independently of ``prosmin_bench.metrics.collapse``: singular values from the
eigenvalues of the covariance (``numpy.linalg.eigvalsh``), RankMe written out from Garrido et al.'s Eq. 1, the
per-dimension std with torch's ``F.normalize`` and ``Tensor.std``.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prosmin_bench
from prosmin_bench import cards
from prosmin_bench.errors import CardError
from prosmin_bench.features import FeatureSet
from prosmin_bench.metrics import higher_is_better
from prosmin_bench.models import ARCHITECTURES, MINI_PREPROCESS, ModelSpec, WeightsSource
from prosmin_bench.pretrain.config import ConfigError
from prosmin_bench.pretrain.monitor import CollapseMonitor, attainable_rank, batch_collapse_stats, target_modules
from prosmin_bench.results import ResultRecord
from prosmin_bench.settings import EvalSettings
from prosmin_bench.tasks import TaskContext, build_task, get_task_spec
from prosmin_bench.tasks.collapse import dims_metric_name, embedding_collapse_metrics


# ------------------------------------------------------------------------------------------ references
def ref_singular_values(x: np.ndarray) -> np.ndarray:
    """Singular values of the centred matrix from the eigenvalues of its Gram matrix (descending)."""
    xc = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    ev = np.linalg.eigvalsh(xc.T @ xc if xc.shape[0] >= xc.shape[1] else xc @ xc.T)[::-1]
    return np.sqrt(np.clip(ev, 0.0, None))


def ref_rankme(x: np.ndarray) -> float:
    s = ref_singular_values(x)
    p = s / s.sum() + 1e-7  # Garrido et al. 2023, Eq. 1
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_dims(x: np.ndarray, fraction: float) -> int:
    var = np.sort(ref_singular_values(x) ** 2)[::-1]
    share = np.cumsum(var) / var.sum()
    return int(np.argmax(share >= fraction - 1e-12) + 1)


def ref_per_dim_std(x: np.ndarray) -> float:
    z = F.normalize(torch.as_tensor(np.asarray(x), dtype=torch.float64), dim=1)
    return float(z.std(dim=0, unbiased=False).mean())


def rank_k(n: int, d: int, k: int, seed: int = 0, equal: bool = False) -> np.ndarray:
    """[n, d] with a centred matrix of rank exactly k (k equal singular values when ``equal``)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, k))
    a -= a.mean(axis=0)
    if equal:  # orthonormal, centred columns -> k equal singular values
        a, _ = np.linalg.qr(a)
    basis, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return a @ basis.T + rng.standard_normal(d)  # plus a common offset, which centring removes


# ------------------------------------------------------------------------------- metrics of known rank
@pytest.mark.parametrize("k", [1, 2, 7, 20])
def test_rank_k_embeddings_need_k_dims_and_have_effective_rank_at_most_k(k):
    x = rank_k(200, 32, k, seed=k)
    m = embedding_collapse_metrics(x, 0.99)
    assert m["dims_99"] <= k
    # RankMe's eps (1e-7, Garrido et al. Eq. 1) adds -eps * ln(eps) = 1.6e-6 nats per zero singular value
    assert m["effective_rank"] <= k * (1 + (32 - k) * 1.7e-6)
    eq = embedding_collapse_metrics(rank_k(200, 32, k, seed=k, equal=True), 0.99)
    assert eq["dims_99"] == k  # equal variances: every one of the k directions is needed
    assert eq["effective_rank"] == pytest.approx(k, rel=1e-4)
    assert eq["effective_rank_frac"] == pytest.approx(k / 32, rel=1e-4)


def test_task_metrics_match_direct_numpy():
    x = np.random.default_rng(3).standard_normal((150, 24)) @ np.diag(np.linspace(3.0, 0.1, 24)) + 0.5
    m = embedding_collapse_metrics(x, 0.9)
    assert set(m) == {"effective_rank", "effective_rank_frac", "dims_90", "per_dim_std", "per_dim_std_x_sqrt_d"}
    assert m["effective_rank"] == pytest.approx(ref_rankme(x), rel=1e-9)
    assert m["effective_rank_frac"] == pytest.approx(ref_rankme(x) / 24, rel=1e-9)
    assert m["dims_90"] == ref_dims(x, 0.9)
    assert m["per_dim_std"] == pytest.approx(ref_per_dim_std(x), rel=1e-9)
    assert m["per_dim_std_x_sqrt_d"] == pytest.approx(ref_per_dim_std(x) * math.sqrt(24), rel=1e-9)


def test_dims_metric_names():
    assert [dims_metric_name(f) for f in (0.99, 0.9, 0.999, 0.5)] == ["dims_99", "dims_90", "dims_99.9", "dims_50"]


# ------------------------------------------------------------------------ the task with given features
class _Features:
    """A feature source for a TaskContext: fixed arrays per layer, and a log of what was asked for."""

    def __init__(self, layers: dict[str, np.ndarray]) -> None:
        self.layers, self.asked = layers, []

    def __call__(self, ref, layer, **kwargs):
        self.asked.append((str(ref), layer))  # a parsed DatasetRef, as the card wrote it
        x = self.layers[layer]
        return FeatureSet(x, np.zeros(len(x), dtype=np.int64), key=layer)


def _ctx(source, predictive: bool, seed: int = 0) -> TaskContext:
    model = SimpleNamespace(spec=SimpleNamespace(feature_layer="cls"), has_predictive=predictive, has_projector=False)
    return TaskContext(model=model, seed=seed, settings=EvalSettings(), feature_fn=source,
                       dataset_fn=lambda ref: None)


def test_task_run_without_predictive_head_reports_backbone_metrics_only():
    x = np.random.default_rng(0).standard_normal((120, 16)).astype(np.float32)
    src = _Features({"cls": x})
    task = build_task(get_task_spec("digits_collapse"))
    out = task.run(_ctx(src, predictive=False))
    assert src.asked == [("digits:test", "cls")]
    assert set(out.metrics) == {
        "effective_rank", "effective_rank_frac", "dims_99", "per_dim_std", "per_dim_std_x_sqrt_d",
    }
    assert set(out.metrics) <= set(task.metric_names())
    assert out.metrics["effective_rank"] == pytest.approx(ref_rankme(x), rel=1e-6)
    s = ref_singular_values(x)
    assert out.extras["spectrum"] == pytest.approx((s / s.sum()).tolist(), rel=1e-6, abs=1e-12)
    assert out.extras["dim"] == 16 and out.extras["n_samples"] == 120


def test_task_run_with_predictive_head_adds_mu_and_sigma():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((100, 16)).astype(np.float32)
    mu = rank_k(100, 40, 3, seed=2).astype(np.float32)
    sigma = rng.uniform(0.1, 2.0, (100, 40)).astype(np.float32)
    src = _Features({"cls": x, "predictive_mu": mu, "predictive_sigma": sigma})
    task = build_task(get_task_spec("digits_collapse"))
    out = task.run(_ctx(src, predictive=True))
    # the stub has a predictive head but no projector: every metric except the projector's
    assert set(out.metrics) == {n for n in task.metric_names() if not n.startswith("proj_")}
    assert out.metrics["mu_effective_rank"] == pytest.approx(ref_rankme(mu), rel=1e-5)
    assert out.metrics["mu_dims_99"] <= 3
    assert out.metrics["mu_effective_rank_frac"] == pytest.approx(ref_rankme(mu) / 40, rel=1e-5)
    assert out.metrics["sigma_mean"] == pytest.approx(float(sigma.astype(np.float64).mean()), rel=1e-9)
    assert out.metrics["effective_rank"] == pytest.approx(ref_rankme(x), rel=1e-6)


def test_task_subsamples_rows_by_seed(tmp_path):
    x = np.random.default_rng(4).standard_normal((300, 8))
    (tmp_path / "c.toml").write_text(
        'name = "tiny_collapse"\nkind = "collapse"\nversion = 1\nsuite = "mini"\nmain_score = "effective_rank"\n'
        '[datasets]\ndata = "digits:test"\n[protocol]\nmax_samples = 50\nspectrum_size = 3\n'
    )
    cards.add_card_dir(tmp_path)
    task = build_task(get_task_spec("tiny_collapse"))
    a, b, a2 = (task.run(_ctx(_Features({"cls": x}), False, seed)) for seed in (0, 1, 0))
    assert a.extras["n_samples"] == 50 and len(a.extras["spectrum"]) == 3
    assert a.metrics == a2.metrics and a.metrics != b.metrics
    rows = np.sort(np.random.default_rng(0 * 1000 + 11).choice(300, 50, replace=False))  # TaskContext.rng(11)
    assert a.metrics["effective_rank"] == pytest.approx(ref_rankme(x[rows]), rel=1e-9)


@pytest.mark.parametrize("protocol, field", [
    ("variance_fraction = 1.5", "variance_fraction"),
    ("spectrum_size = 0", "spectrum_size"),
    ("max_samples = -3", "max_samples"),
    ('predictive = "yes"', "predictive"),
    ("bins = 3", "bins"),
])
def test_bad_protocol_is_a_card_error(tmp_path, protocol, field):
    (tmp_path / "bad.toml").write_text(
        'name = "bad_collapse"\nkind = "collapse"\nversion = 1\nsuite = "mini"\nmain_score = "effective_rank"\n'
        f'[datasets]\ndata = "digits:test"\n[protocol]\n{protocol}\n'
    )
    cards.add_card_dir(tmp_path)
    with pytest.raises(CardError, match=field):
        get_task_spec("bad_collapse")


def test_cards_and_metric_directions():
    for name, suite, data in (("digits_collapse", "mini", "digits:test"),
                              ("imagenet_collapse", "imagenet", "imagenet:val")):
        spec = get_task_spec(name)
        assert (spec.kind, spec.suite, spec.main_score) == ("collapse", suite, "effective_rank")
        assert spec.datasets == {"data": data}
        assert name in prosmin_bench.list_tasks(suite)
    names = build_task(get_task_spec("digits_collapse")).metric_names()
    # more spread (rank, dims, std) is better; sigma_mean has no better direction and takes the default
    assert all(higher_is_better(n) for n in names)


# ----------------------------------------------------------------- end to end: random, trained, collapsed
class _RankTwo(nn.Module):
    """vit_micro's final-norm CLS projected onto a random 2-d subspace: a deliberately collapsed backbone."""

    def __init__(self) -> None:
        super().__init__()
        from prosmin_bench.models.architectures import vit_micro

        self.vit = vit_micro()
        self.num_features = 96
        u, _ = torch.linalg.qr(torch.randn(96, 2))
        self.register_buffer("proj", u @ u.T)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)[:, 0] @ self.proj


class _PixelProjection(nn.Module):
    """Raw pixels [N, 3 * 32 * 32] times a random orthonormal [3072, 96]: a spread-out embedding that separates
    the digits (raw pixels reach k-NN 0.98 on them), standing in for a trained backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features = 96
        q, _ = torch.linalg.qr(torch.randn(3 * 32 * 32, 96))
        self.register_buffer("proj", q)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.proj


@pytest.fixture
def toy_models():
    ARCHITECTURES.add("test_rank_two", _RankTwo)
    ARCHITECTURES.add("test_pixel_projection", _PixelProjection)
    specs = [
        ModelSpec(name=name, arch=arch, weights=WeightsSource(random=True, seed=0), preprocess=MINI_PREPROCESS,
                  scale="mini")
        for name, arch in (("collapsed_rank2", "test_rank_two"), ("pixel_projection", "test_pixel_projection"))
    ]
    yield specs
    ARCHITECTURES.remove("test_rank_two")
    ARCHITECTURES.remove("test_pixel_projection")


def test_evaluate_tells_random_trained_and_collapsed_apart(tmp_path, toy_models):
    recs = prosmin_bench.evaluate(["random_micro", *toy_models], ["digits_collapse"], results_dir=tmp_path,
                                  device="cpu")
    assert all(isinstance(r, ResultRecord) for r in recs), [getattr(r, "message", "") for r in recs]
    by = {r.model: r for r in recs}
    rnd, col, good = by["random_micro"].mean, by["collapsed_rank2"].mean, by["pixel_projection"].mean
    for m in (rnd, col, good):
        assert not any(k.startswith(("mu_", "sigma")) for k in m)  # no predictive head: absent, not NaN
    assert col["effective_rank"] <= 2 + 1e-3 and col["dims_99"] <= 2
    assert good["effective_rank"] > 25 and good["dims_99"] > 25
    for metric in ("effective_rank", "effective_rank_frac", "dims_99", "per_dim_std_x_sqrt_d"):
        assert col[metric] < rnd[metric] < good[metric], metric
    for r in recs:
        assert r.main_score == "effective_rank" and r.main_value == r.mean["effective_rank"]
        s = r.extras["spectrum"]
        assert len(s) == 96 and sum(s) == pytest.approx(1.0) and s == sorted(s, reverse=True)


# ----------------------------------------------------------------------------------------- the monitor
def test_batch_stats_match_direct_numpy_for_tensors():
    x = torch.randn(64, 20, dtype=torch.float64) @ torch.diag(torch.linspace(2.0, 0.01, 20, dtype=torch.float64)) + 1.0
    s = batch_collapse_stats(x)
    assert set(s) == {"effective_rank", "per_dim_std"}
    assert s["effective_rank"] == pytest.approx(ref_rankme(x.numpy()), rel=1e-9)
    assert s["per_dim_std"] == pytest.approx(ref_per_dim_std(x.numpy()), rel=1e-9)
    low = batch_collapse_stats(torch.from_numpy(rank_k(64, 20, 2)).float())
    assert low["effective_rank"] < 2.001
    half = torch.from_numpy(rank_k(64, 20, 2)).to(torch.bfloat16)  # autocast outputs: read as they are
    assert batch_collapse_stats(half)["effective_rank"] == pytest.approx(ref_rankme(half.double().numpy()), rel=1e-6)
    assert attainable_rank(64, 20) == 20 and attainable_rank(16, 20) == 15


def test_monitor_every_n_steps_and_warns_once_after_a_fall(caplog):
    healthy = rank_k(64, 16, 16, equal=True)
    collapsed = rank_k(64, 16, 1)
    mon = CollapseMonitor(every=5, warn_fraction=0.25)
    with caplog.at_level(logging.INFO, logger="prosmin_bench.pretrain.monitor"):
        assert mon.observe(3, {"head": healthy}) == {}  # not due
        first = mon.observe(0, {"head": collapsed})  # starts narrow (an initialisation): logged, no warning
        assert first["head_effective_rank"] < 1.01
        assert not [r for r in caplog.records if r.levelno == logging.WARNING]
        ok = mon.observe(5, {"head": healthy})
        assert ok["head_effective_rank"] == pytest.approx(16, rel=1e-4)
        for step in (10, 15, 20):
            mon.observe(step, {"head": collapsed})
        mon.observe(25, {"head": healthy})
        mon.observe(30, {"head": collapsed})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 10" in warnings[0].getMessage() and "head" in warnings[0].getMessage()
    assert CollapseMonitor(every=0, warn_fraction=0.5).observe(0, {"head": healthy}) == {}
    for bad in ({"every": -1, "warn_fraction": 0.1}, {"every": 5, "warn_fraction": 1.5}):
        with pytest.raises(ConfigError):
            CollapseMonitor(**bad)


def test_monitor_hooks_read_the_targets_own_forward():
    from prosmin_bench.pretrain import resolve_config
    from prosmin_bench.pretrain.data import PretrainData
    from prosmin_bench.pretrain.methods import Progress
    from prosmin_bench.pretrain.train import build_method

    cfg = resolve_config("prosmin_micro", overrides={"optim.batch_size": 32})
    torch.manual_seed(0)
    method = build_method(cfg)
    batch = next(PretrainData(cfg, torch.device("cpu")).batches(0))
    calls = []
    method.target.backbone.register_forward_hook(lambda *a: calls.append(1))
    mon = CollapseMonitor(every=2, warn_fraction=0.1)
    mon.watch(target_modules(method))
    with mon.capture(1):  # not due: nothing kept
        method(batch, Progress(1, 10, 5))
    assert mon.collect(1) == {}
    with mon.capture(2):
        method(batch, Progress(2, 10, 5))
    stats = mon.collect(2)
    assert len(calls) == 2  # one target pass per step: the monitor ran no forward of its own
    with torch.no_grad():  # the reference: the target network run again here, outside the monitor
        feats = method.target.backbone(torch.cat(batch.global_views))
        head = method.target.head(feats)
    assert stats["backbone_effective_rank"] == pytest.approx(ref_rankme(feats.double().numpy()), rel=1e-4)
    assert stats["backbone_per_dim_std"] == pytest.approx(ref_per_dim_std(feats.numpy()), rel=1e-4)
    assert stats["head_effective_rank"] == pytest.approx(ref_rankme(head.double().numpy()), rel=1e-4)
    assert stats["head_per_dim_std"] == pytest.approx(ref_per_dim_std(head.numpy()), rel=1e-4)
    mon.close()
    with mon.capture(4):
        method(batch, Progress(4, 10, 5))
    assert mon.collect(4) == {}  # hooks removed


def test_prosmin_checkpoint_adds_online_mu_and_sigma(tmp_path):
    """A real pretraining checkpoint (one ProSMin step) carries the online predictor: mu_* and sigma_mean appear."""
    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.models import get_model
    from prosmin_bench.pretrain import pretrain
    from prosmin_bench.runner import RunOptions

    path = pretrain("prosmin_micro", out_dir=tmp_path / "ckpt", device="cpu",
                    overrides={"run.max_steps": 1, "optim.batch_size": 16})
    opts = RunOptions(weights=str(path), device="cpu", results_dir=tmp_path / "results")
    (rec,) = prosmin_bench.evaluate(["prosmin_micro"], ["digits_collapse"], options=opts)
    assert isinstance(rec, ResultRecord), getattr(rec, "message", "")
    assert set(rec.mean) == set(build_task(get_task_spec("digits_collapse")).metric_names())
    model = get_model("prosmin_micro", weights=path)
    ds = resolve_dataset("digits:test").with_transform(model.transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        mu, sigma = model.predictive(images)
    assert rec.mean["sigma_mean"] == pytest.approx(float(sigma.double().mean()), rel=1e-5)
    assert rec.mean["mu_effective_rank"] == pytest.approx(ref_rankme(mu.double().numpy()), rel=1e-4)
    assert rec.mean["mu_per_dim_std"] == pytest.approx(ref_per_dim_std(mu.numpy()), rel=1e-4)
    assert rec.extras["mu_dim"] == mu.shape[1] == 256


def test_pretraining_loop_logs_collapse_statistics(tmp_path):
    """The loop writes the target's effective rank to log.jsonl every `run.monitor_every` steps."""
    import json

    import numpy as np

    from prosmin_bench.pretrain import pretrain

    pretrain("prosmin_micro", out_dir=tmp_path, device="cpu",
             overrides={"run.max_steps": 2, "run.monitor_every": 1, "optim.batch_size": 16})
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    ranks = [line["backbone_effective_rank"] for line in lines if "backbone_effective_rank" in line]
    assert len(ranks) == 2
    # a batch of 16 rows has at most 15 centred dimensions
    assert all(1.0 < r <= 15.0 + 1e-6 for r in ranks) and np.isfinite(ranks).all()
