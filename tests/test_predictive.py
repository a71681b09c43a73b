"""ProSMin's predictive distribution as an uncertainty signal (issue 10) and projector collapse metrics (issue 7).

References are independent of the code under test: scikit-learn's ``roc_auc_score`` / ``average_precision_score``,
``scipy.stats.spearmanr``, a pair-by-pair loop for the sample dispersion, the probe's logits recomputed from the
cached head weights, the projection recomputed from the checkpoint's ``online`` state with a fresh DINO head, and
RankMe from numpy's SVD.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from prosmin_bench import cards, config
from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.results import ResultRecord
from prosmin_bench.runner import RunOptions, evaluate

K = 32  # width of the constructed predictive heads

# A quick linear probe (one lr, few epochs) and an OOD task on its head: the protocol is the cards', only smaller.
_CARDS = {
    "p_linear.toml": """
        name = "p_linear"
        kind = "linear"
        version = 1
        suite = "mini"
        main_score = "top1"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        [protocol]
        layer = "cls"
        epochs = 10
        batch_size = 256
        base_lrs = [0.3]
    """,
    "p_ood.toml": """
        name = "p_ood"
        kind = "ood"
        version = 1
        suite = "mini"
        main_score = "auroc"
        [datasets]
        train = "digits:train"
        test = "digits:test"
        ood = "digits_o:test"
        [protocol]
        head_task = "p_linear"
    """,
}


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cards")
    for name, text in _CARDS.items():
        (d / name).write_text(textwrap.dedent(text))
    return d


@pytest.fixture(autouse=True)
def _cards(card_dir):
    cards.add_card_dir(card_dir)  # the conftest clears card folders around every test


def _images(model, ref: str) -> torch.Tensor:
    from prosmin_bench.data import resolve_dataset

    ds = resolve_dataset(ref).with_transform(model.transform)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def _ref_dispersion(mu: np.ndarray, sigma: np.ndarray, eps: np.ndarray, distance: str) -> np.ndarray:
    """Mean over ordered pairs j != k of d(z_j, z_k), z_j = mu + sigma * eps_j, one image and one pair at a time."""
    n, r, _ = eps.shape
    out = np.zeros(n)
    for i in range(n):
        z = mu[i][None, :] + sigma[i][None, :] * eps[i]
        total = 0.0
        for j in range(r):
            for k in range(r):
                if j != k:
                    diff = z[j] - z[k]
                    total += np.abs(diff).mean() if distance == "l1" else np.sqrt((diff**2).sum())
        out[i] = total / (r * (r - 1))
    return out


# ----------------------------------------------------------------------------------------- scoring functions
@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_dispersion_matches_a_pairwise_loop_and_does_not_depend_on_chunking(distance):
    from prosmin_bench.tasks.ood import predictive_dispersion

    g = np.random.default_rng(0)
    mu = g.standard_normal((37, 9)) * 5.0
    sigma = g.uniform(0.1, 2.0, (37, 9))
    rows = np.array([0, 3, 4, 20, 36])
    eps = np.random.default_rng(7).standard_normal((len(rows), 5, 9))
    expected = _ref_dispersion(mu[rows], sigma[rows], eps, distance)
    for chunk in (1, 2, 256):
        got = predictive_dispersion(mu, sigma, r=5, distance=distance, rng=np.random.default_rng(7), rows=rows,
                                    chunk=chunk)
        np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_dispersion_l1_expectation_is_two_over_sqrt_pi_times_mean_sigma():
    """E|s (e_j - e_k)| = s * E|N(0, 2)| = 2 s / sqrt(pi): mu cancels, the score estimates a function of sigma."""
    from prosmin_bench.tasks.ood import mean_sigma, predictive_dispersion

    g = np.random.default_rng(1)
    sigma = g.uniform(0.2, 3.0, (6, 4000))
    mu = g.standard_normal((6, 4000)) * 100.0
    got = predictive_dispersion(mu, sigma, r=4, distance="l1", rng=np.random.default_rng(2))
    np.testing.assert_allclose(got, 2.0 / np.sqrt(np.pi) * mean_sigma(sigma), rtol=0.02)


def test_sigma_error_metrics_against_sklearn_and_scipy():
    from scipy.special import log_softmax
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from prosmin_bench.tasks.linear import sigma_error_metrics

    g = np.random.default_rng(3)
    logits = g.standard_normal((200, 5)) * 2.0
    labels = g.integers(0, 5, 200)
    u = g.uniform(size=200)
    m, about = sigma_error_metrics(u, logits, labels)
    nll = -log_softmax(logits, axis=1)[np.arange(200), labels]
    wrong = logits.argmax(1) != labels
    assert m["sigma_err_spearman"] == pytest.approx(spearmanr(u, nll).statistic, abs=1e-12)
    assert m["sigma_misclf_auroc"] == pytest.approx(roc_auc_score(wrong, u), abs=1e-12)
    assert about["n_misclassified"] == int(wrong.sum())
    # a constant sigma: no rank correlation (left out, not NaN) and an AUROC of exactly one half
    m, about = sigma_error_metrics(np.full(200, 0.3), logits, labels)
    assert m == {"sigma_misclf_auroc": 0.5} and "sigma_err_spearman" in about["skipped"]


# ------------------------------------------------------------------- a constructed head, end to end
class _MarkedSigma(nn.Module):
    """images -> (mu, sigma): sigma = ``levels[i]`` on the images of ``marked[i]`` (matched by content), ``low``
    elsewhere; mu a fixed random projection of the pixels (irrelevant to both scores)."""

    def __init__(self, low: float, marked: tuple[torch.Tensor, ...] = (), levels: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.sets = [m.flatten(1) for m in marked]
        self.levels, self.low = levels, low
        self.proj = torch.randn(3 * 32 * 32, K, generator=torch.Generator().manual_seed(0))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = images.flatten(1)
        sigma = torch.full((len(flat),), self.low)
        for bank, level in zip(self.sets, self.levels):
            hit = _nearest(flat, bank) < 1e-4
            sigma = torch.where(hit, torch.tensor(level), sigma)
        return flat @ self.proj, sigma[:, None].expand(-1, K).contiguous()


def _nearest(x: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Distance from each row of x [N, D] to its nearest row of bank [M, D], in float64 (distinct digit images are
    at least ~0.9 apart after normalisation; the matrix-product shortcut's rounding is ~1e-6 in float64)."""
    return torch.cdist(x.double(), bank.double(), compute_mode="use_mm_for_euclid_dist").min(dim=1).values


def _evaluate_with_head(monkeypatch, tmp_path, tag: str, head: nn.Module, tasks: list[str]) -> dict[str, ResultRecord]:
    """Run ``tasks`` through the runner on random_micro carrying ``head`` as its predictive distribution."""
    import prosmin_bench.runner as runner
    from prosmin_bench.models import Backbone, get_model

    base = get_model("random_micro")
    # its own weights id and cache: the feature cache must not serve another head's sigma
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / f"home_{tag}"))
    model = Backbone(base.spec, base.net, f"{base.weights_sha256}-{tag}", predictive=head)
    monkeypatch.setattr(runner, "get_model", lambda *a, **k: model)
    recs = evaluate(["random_micro"], tasks, options=RunOptions(seeds=(0,), device="cpu",
                                                               results_dir=tmp_path / tag))
    for r in recs:
        assert isinstance(r, ResultRecord), getattr(r, "message", r)
    return {r.task: r for r in recs}


def test_constructed_heads_auroc_one_on_the_marked_sets_and_one_half_when_constant(tmp_path, monkeypatch):
    from sklearn.metrics import roc_auc_score

    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.models import get_model

    model = get_model("random_micro")
    test_images, ood_images = _images(model, "digits:test"), _images(model, "digits_o:test")
    labels = np.asarray(resolve_dataset("digits:test").labels)

    # constant sigma: no signal at all (ties count one half); the dispersion is then pure sampling noise
    const = _evaluate_with_head(monkeypatch, tmp_path, "const", _MarkedSigma(0.7), ["p_linear", "p_ood"])
    c = const["p_ood"].mean
    assert (c["sigma_auroc"], c["sigma_fpr95"]) == (0.5, 1.0)
    assert abs(c["dispersion_auroc"] - 0.5) < 0.1
    assert const["p_linear"].mean["sigma_misclf_auroc"] == 0.5
    assert "sigma_err_spearman" not in const["p_linear"].mean  # undefined for a constant: absent, not NaN
    # the probe's errors, recomputed from its cached weights (the probe sees the backbone features only)
    (head_file,) = config.heads_dir().rglob("*.pt")
    blob = torch.load(head_file, weights_only=True)
    with torch.no_grad():
        logits = model.features(test_images, "cls").double() @ blob["weight"].double().T + blob["bias"].double()
    wrong = logits.argmax(1).numpy() != labels
    assert 0 < wrong.sum() < len(wrong)
    assert const["p_linear"].mean["top1"] == pytest.approx(1.0 - wrong.mean(), abs=1e-9)

    # sigma 2 on the OOD images, 1 on the probe's misclassified test images, 0.5 on its correct ones: sigma
    # separates ID from OOD, and misclassified from correct test images, perfectly
    head = _MarkedSigma(0.5, (test_images[torch.from_numpy(wrong)], ood_images), (1.0, 2.0))
    marked = _evaluate_with_head(monkeypatch, tmp_path, "marked", head, ["p_linear", "p_ood"])
    m = marked["p_ood"].mean
    assert (m["sigma_auroc"], m["sigma_aupr_in"], m["sigma_aupr_out"], m["sigma_fpr95"]) == (1.0, 1.0, 1.0, 0.0)
    assert m["dispersion_auroc"] == 1.0 and m["dispersion_fpr95"] == 0.0
    assert m["auroc"] == pytest.approx(c["auroc"])  # MSP does not depend on the predictive head
    assert marked["p_ood"].protocol["predictive_samples"] == 4
    assert marked["p_ood"].protocol["predictive_distance"] == "l1"
    lin = marked["p_linear"].mean
    # 1.0 unless a misclassified test image has an identical twin the probe gets right: sklearn says which
    twin = _nearest(test_images.flatten(1), test_images[torch.from_numpy(wrong)].flatten(1)).numpy() < 1e-4
    sigma = np.where(twin, 1.0, 0.5)
    assert lin["sigma_misclf_auroc"] == pytest.approx(roc_auc_score(wrong, sigma), abs=1e-12)
    assert lin["sigma_misclf_auroc"] > 0.99
    assert lin["sigma_err_spearman"] > 0.3


# ------------------------------------------------------------------- a real pretraining checkpoint
@pytest.fixture(scope="module")
def prosmin_ckpt(tmp_path_factory):
    from prosmin_bench.pretrain import pretrain

    out = tmp_path_factory.mktemp("prosmin_ckpt")
    return pretrain("prosmin_micro", out_dir=out, device="cpu",
                    overrides={"run.max_steps": 2, "optim.batch_size": 16})


def test_registry_exposes_predictive_and_projector_only_for_pretraining_checkpoints(prosmin_ckpt):
    from prosmin_bench.models import get_model
    from prosmin_bench.models.converters import strip_prefix
    from prosmin_bench.pretrain.checkpoint import load
    from prosmin_bench.pretrain.methods import config_from_dict

    model = get_model("prosmin_micro", weights=prosmin_ckpt)
    assert model.has_predictive and model.has_projector
    images = _images(model, "digits:test")[:24]
    with torch.no_grad():
        mu, sigma = model.predictive(images)
        z = model.projector(images)
    assert mu.shape == sigma.shape == z.shape == (24, 256) and bool((sigma > 0).all())
    # the projection recomputed from the checkpoint's online state (ProSMin is evaluated on its online network, the
    # paper's Sec. 6): a fresh head on the (online) backbone
    ckpt = load(prosmin_ckpt)
    head = _reference_head("prosmin", model.embed_dim, config_from_dict(ckpt["config"]).method_config)
    head.load_state_dict(strip_prefix(ckpt["online"], "head."), strict=True)
    head.eval()  # the registry evaluates in eval mode (BN heads use their running statistics)
    with torch.no_grad():
        ref = head(model.net(images))
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)

    plain = get_model("random_micro")
    assert not plain.has_predictive and not plain.has_projector
    with pytest.raises(ProsminBenchError, match="has no predictive head"):
        plain.predictive(images)
    with pytest.raises(ProsminBenchError, match="has no projection head"):
        plain.projector(images)


def test_heads_that_do_not_match_the_checkpoints_config_are_named(prosmin_ckpt):
    """A checkpoint whose online state is not what its own config builds (e.g. written by another version) is
    refused with the missing, unexpected and mis-shaped keys in the one-line message."""
    from prosmin_bench.errors import WeightsError
    from prosmin_bench.pretrain.checkpoint import load
    from prosmin_bench.models.networks import build_eval_modules

    ckpt = load(prosmin_ckpt)
    online = dict(ckpt["online"])
    online["predictor.log_var.bias"] = torch.zeros(256)
    online["predictor.mu.weight"] = torch.zeros(3, 3)
    del online["predictor.log_var.weight"]
    with pytest.raises(WeightsError) as err:
        build_eval_modules({**ckpt, "online": online})
    message = str(err.value)
    assert "\n" not in message
    assert "missing keys [predictor.log_var.weight] (1)" in message
    assert "unexpected keys [predictor.log_var.bias] (1)" in message
    assert "predictor.mu.weight: checkpoint (3, 3) vs model (256, 256)" in message
    assert "pretrain it again" in message


def _reference_head(method: str, embed_dim: int, cfg) -> nn.Module:
    """A fresh projection head of ``method``, built from its config alone (not through the method class)."""
    from prosmin_bench.models.heads import DINOHead, build_mlp

    if method == "mocov3":
        return build_mlp(3, embed_dim, cfg.mlp_dim, cfg.dim)
    return DINOHead(embed_dim, cfg.out_dim, hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim,
                    nlayers=cfg.head_nlayers, use_bn=cfg.head_use_bn, norm_last_layer=cfg.norm_last_layer)


@pytest.mark.parametrize("recipe", ["dino_micro", "mocov3_micro"])
def test_deterministic_pretraining_checkpoints_have_a_projector_but_no_predictive_head(recipe, tmp_path):
    from prosmin_bench.models import get_model
    from prosmin_bench.models.converters import strip_prefix
    from prosmin_bench.pretrain import pretrain
    from prosmin_bench.pretrain.checkpoint import load
    from prosmin_bench.pretrain.methods import config_from_dict
    from prosmin_bench.pretrain.recipes import RECIPES

    if recipe not in RECIPES:
        import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
    path = pretrain(recipe, out_dir=tmp_path, device="cpu", overrides={"run.max_steps": 1, "optim.batch_size": 16})
    model = get_model(recipe, weights=path)
    assert model.has_projector and not model.has_predictive
    images = _images(model, "digits:test")[:20]
    with pytest.raises(ProsminBenchError, match="has no predictive head"):
        model.predictive(images)
    ckpt = load(path)
    head = _reference_head(ckpt["method"], model.embed_dim, config_from_dict(ckpt["config"]).method_config)
    # the projector is the evaluated network's own head on the evaluated backbone (MoCo-v3: the base encoder's)
    network = "online" if recipe == "mocov3_micro" else "target"
    head.load_state_dict(strip_prefix(ckpt[network], "head."), strict=True)
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.projector(images), head(model.net(images)), rtol=1e-5, atol=1e-6)
        other = _reference_head(ckpt["method"], model.embed_dim, config_from_dict(ckpt["config"]).method_config)
        other.load_state_dict(strip_prefix(ckpt["target" if network == "online" else "online"], "head."), strict=True)
        assert not torch.allclose(model.projector(images), other.eval()(model.net(images)))


def test_prosmin_checkpoint_end_to_end_against_references(prosmin_ckpt, tmp_path, monkeypatch):
    from scipy.special import log_softmax
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from prosmin_bench import leaderboard
    from prosmin_bench.data import resolve_dataset
    from prosmin_bench.metrics import effective_rank
    from prosmin_bench.models import get_model
    from prosmin_bench.tasks.ood import _RNG_ID, _RNG_OOD

    res = tmp_path / "r"
    tasks = ["p_linear", "p_ood", "digits_collapse"]
    recs = {r.task: r for r in evaluate(["prosmin_micro"], tasks, options=RunOptions(
        seeds=(0,), device="cpu", results_dir=res, weights=str(prosmin_ckpt)))}
    for r in recs.values():
        assert isinstance(r, ResultRecord), getattr(r, "message", r)

    model = get_model("prosmin_micro", weights=prosmin_ckpt)
    x_test, x_ood = _images(model, "digits:test"), _images(model, "digits_o:test")
    with torch.no_grad():
        mu_test, s_test = (t.double().numpy() for t in model.predictive(x_test))
        mu_ood, s_ood = (t.double().numpy() for t in model.predictive(x_ood))
        z_test = model.projector(x_test).double().numpy()
        feats = model.features(x_test, "cls").double()
    u_test, u_ood = s_test.mean(1), s_ood.mean(1)

    # OOD: higher sigma = more likely OOD, OOD positive
    o = recs["p_ood"].mean
    is_ood = np.r_[np.zeros(len(u_test)), np.ones(len(u_ood))]
    assert o["sigma_auroc"] == pytest.approx(roc_auc_score(is_ood, np.r_[u_test, u_ood]), abs=1e-6)
    # the noise: seed 0's streams for the ID and the OOD set (TaskContext.rng: seed * 1000 + offset)
    eps_id = np.random.default_rng(0 * 1000 + _RNG_ID).standard_normal((len(u_test), 4, 256))
    eps_ood = np.random.default_rng(0 * 1000 + _RNG_OOD).standard_normal((len(u_ood), 4, 256))
    d_test = _ref_dispersion(mu_test, s_test, eps_id, "l1")
    d_ood = _ref_dispersion(mu_ood, s_ood, eps_ood, "l1")
    extras = recs["p_ood"].extras["predictive"]
    assert (extras["r"], extras["distance"], extras["noise_seed"]) == (4, "l1", 0)
    assert o["dispersion_auroc"] == pytest.approx(roc_auc_score(is_ood, np.r_[d_test, d_ood]), abs=1e-6)

    # linear probe: sigma vs the probe's per-sample NLL and its misclassifications
    (head_file,) = config.heads_dir().rglob("*.pt")  # the one p_linear head, shared with p_ood
    h = torch.load(head_file, weights_only=True)
    logits = (feats @ h["weight"].double().T + h["bias"].double()).numpy()
    lin = recs["p_linear"].mean
    labels = np.asarray(resolve_dataset("digits:test").labels)
    assert lin["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-9)
    nll = -log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
    assert lin["sigma_err_spearman"] == pytest.approx(spearmanr(u_test, nll).statistic, abs=1e-6)
    assert lin["sigma_misclf_auroc"] == pytest.approx(roc_auc_score(logits.argmax(1) != labels, u_test), abs=1e-6)

    # collapse: the projector outputs (as extracted: a 2-step model is nearly collapsed, so the small singular
    # values that RankMe sums are sensitive to float32 rounding and the extraction's own batches are used)
    from prosmin_bench.data import dataset_key
    from prosmin_bench.features import cache_key, load_cached

    ds = resolve_dataset("digits:test")
    key = cache_key(model, dataset_key("digits:test"), ds.fingerprint, "projector", "fp32", "float32")
    cached = load_cached(key, config.features_dir())
    z = np.asarray(cached.features, dtype=np.float64)
    np.testing.assert_allclose(z, z_test, rtol=1e-4, atol=1e-5)
    c = recs["digits_collapse"].mean
    s = np.linalg.svd(z - z.mean(0), compute_uv=False)
    p = s / s.sum() + 1e-7  # RankMe, Garrido et al. 2023, Eq. 1
    assert c["proj_effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    assert c["proj_effective_rank"] == pytest.approx(effective_rank(z), rel=1e-9)
    assert recs["digits_collapse"].extras["proj_dim"] == 256

    # a model without the heads (random_micro): the metrics are absent, not NaN
    monkeypatch.setenv("PROSMIN_BENCH_HOME", str(tmp_path / "plain_home"))
    (plain,) = evaluate(["random_micro"], ["digits_collapse"], options=RunOptions(
        seeds=(0,), device="cpu", results_dir=res))
    assert isinstance(plain, ResultRecord), getattr(plain, "message", plain)
    assert not any(k.startswith(("sigma_", "dispersion_", "proj_", "mu_")) for k in plain.mean)

    # leaderboard: predictive and projector metrics in tables of their own, rows only for the models with them
    page = leaderboard.render(res, "mini")

    def section(task: str) -> str:
        text = page[page.index(f"### {task}@"):]
        return text[: text.index("\n### ", 4)] if "\n### " in text[4:] else text

    main_table, _, rest = section("digits_collapse").partition("Predictive distribution (probabilistic models only).")
    assert "random_micro" in main_table and "prosmin_micro" in main_table
    assert "mu_effective_rank" not in main_table and "proj_effective_rank" not in main_table
    predictive_part, _, projector_part = rest.partition("Projector outputs (checkpoints of the pretraining module")
    assert "`mu_*`: the collapse metrics on the predictive mean" in predictive_part
    assert "prosmin_micro" in predictive_part and "random_micro" not in predictive_part
    assert "`proj_*`: the collapse metrics on the projector outputs" in projector_part
    assert "proj_effective_rank ↑" in projector_part and "random_micro" not in projector_part
    main_table, _, rest = section("p_ood").partition("Predictive distribution (probabilistic models only).")
    assert "sigma_auroc" not in main_table and "msp" not in rest
    assert "`dispersion_*`: OOD detection scored by the expected pairwise distance" in rest
    assert "sigma_auroc (%) ↑" in rest and "dispersion_fpr95 (%) ↓" in rest
    assert "`sigma_misclf_auroc`: AUROC of the mean sigma" in section("p_linear")
