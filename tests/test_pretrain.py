"""The pretraining module: config, augmentation, ProSMin's parts, the loop, checkpoints and resumption."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prosmin_bench.errors import PretrainError, ProsminBenchError
from prosmin_bench.pretrain import pretrain, resolve_config
from prosmin_bench.pretrain.augment import TensorMultiCrop
from prosmin_bench.pretrain.config import ConfigError, MultiCropConfig, PretrainConfig, apply_overrides
from prosmin_bench.models.networks import ProSMinOnline
from prosmin_bench.pretrain.methods import METHODS, MultiCropBatch, Progress, config_from_dict
from prosmin_bench.pretrain.methods.prosmin import ProSMin
from prosmin_bench.pretrain.recipes import RECIPES, get_recipe
from prosmin_bench.pretrain.rng import SampleRNG
from prosmin_bench.pretrain.schedules import clip_gradients_per_parameter, make_schedules
from prosmin_bench.pretrain.train import build_method

REPO = Path(__file__).resolve().parents[1]

#: A tiny ProSMin: one-block 32-wide ViT, narrow heads, batch 32, 2 global + 2 local crops (steps take ~0.1 s).
TINY = {
    "arch_kwargs.depth": 1, "arch_kwargs.embed_dim": 32, "arch_kwargs.num_heads": 2,
    "method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16,
    "method.predictor_hidden_dim": 64, "method.drop_path_rate": 0.1,
    "optim.batch_size": 32, "optim.warmup_epochs": 0.1, "crops.local_crops": 2,
}


def tiny_cfg(**extra) -> PretrainConfig:
    return resolve_config("prosmin_micro", epochs=1, overrides={**TINY, **extra})


def make_batch(cfg: PretrainConfig, b: int = 8, epoch: int = 0) -> MultiCropBatch:
    from prosmin_bench.data.bundled import load_digits_split

    images = torch.from_numpy(load_digits_split("train").images[:b].transpose(0, 3, 1, 2).copy()).float() / 255
    aug = TensorMultiCrop(cfg.crops, cfg.data.mean, cfg.data.std)
    rng = SampleRNG(cfg.run.seed, epoch, list(range(b)))
    g, l = aug(images, rng)
    return MultiCropBatch(g, l, torch.arange(b), rng)


# ---------------------------------------------------------------------------------------------------- config
def test_recipes_are_registered_and_complete():
    assert {"prosmin_micro", "prosmin_vits16_in1k"} <= set(RECIPES.names())
    big = get_recipe("prosmin_vits16_in1k").config
    assert big.arch == "vit_small_patch16" and big.method == "prosmin"
    assert (big.optim.lr, big.optim.batch_size, big.optim.clip_grad) == (0.0005, 512, 3.0)  # paper values
    assert (big.optim.weight_decay, big.optim.weight_decay_end, big.optim.warmup_epochs) == (0.04, 0.4, 30)
    assert (big.crops.global_crops, big.crops.local_crops, big.crops.global_size, big.crops.local_size) == (2, 16, 224, 96)
    m = big.method_config
    assert (m.n_samples, m.distance, m.lam, m.momentum_start) == (4, "l1", 1 / 2.2, 0.9)
    micro = get_recipe("prosmin_micro").config
    assert micro.data.dataset == "digits" and micro.crops.backend == "tensor" and micro.crops.flip_p == 0.0
    with pytest.raises(ProsminBenchError, match="prosmin_micro"):
        get_recipe("prosmin_mikro")


def test_overrides_are_typed_and_unknown_keys_say_what_exists():
    cfg = apply_overrides(get_recipe("prosmin_micro").config, {
        "optim.lr": "2e-3", "method.lam": "0.3", "crops.global_scale": "0.5,1.0", "arch_kwargs.depth": "2",
        "method.include_same_view": "false", "run.max_steps": "none",
    })
    assert cfg.optim.lr == 2e-3 and cfg.method_config.lam == 0.3
    assert cfg.crops.global_scale == (0.5, 1.0) and cfg.arch_kwargs["depth"] == 2
    assert cfg.method_config.include_same_view is False and cfg.run.max_steps is None
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        apply_overrides(cfg, {"optim.lrr": 1})
    with pytest.raises(ConfigError, match="Expected an integer"):
        apply_overrides(cfg, {"optim.epochs": "ten"})


def test_config_round_trips_through_a_plain_dict():
    cfg = tiny_cfg()
    d = cfg.to_dict()
    json.dumps(d)  # plain
    assert config_from_dict(d) == cfg


# ------------------------------------------------------------------------------------------- augmentation
def test_tensor_multicrop_shapes_and_per_image_randomness():
    cfg = tiny_cfg()
    from prosmin_bench.data.bundled import load_digits_split

    imgs = torch.from_numpy(load_digits_split("train").images[:4].transpose(0, 3, 1, 2).copy()).float() / 255
    aug = TensorMultiCrop(cfg.crops, cfg.data.mean, cfg.data.std)
    g, l = aug(imgs, SampleRNG(0, 3, [10, 11, 12, 13]))
    assert len(g) == 2 and len(l) == 2
    assert g[0].shape == (4, 3, 32, 32) and l[0].shape == (4, 3, 16, 16)
    lo, hi = (0 - 0.5) / 0.5, (1 - 0.5) / 0.5
    assert all(float(v.min()) >= lo - 1e-6 and float(v.max()) <= hi + 1e-6 for v in g + l)
    # image 12 gets the same views in another batch composition (randomness is per image, not per batch)
    g2, l2 = aug(imgs[[2, 0]], SampleRNG(0, 3, [12, 10]))
    for a, b in zip(g + l, g2 + l2):
        assert torch.allclose(a[2], b[0], atol=1e-6) and torch.allclose(a[0], b[1], atol=1e-6)
    # another epoch gives other views
    g3, _ = aug(imgs, SampleRNG(0, 4, [10, 11, 12, 13]))
    assert not torch.allclose(g3[0], g[0])


def test_tensor_multicrop_full_crop_without_photometry_is_the_image():
    crops = MultiCropConfig(backend="tensor", global_crops=2, global_size=32, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                            local_crops=0, flip_p=0.0, jitter_p=0.0, hue=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0),
                            solarize_p=0.0)
    imgs = torch.rand(3, 3, 32, 32)
    g, _ = TensorMultiCrop(crops, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(imgs, SampleRNG(0, 0, [0, 1, 2]))
    assert torch.allclose(g[0], imgs, atol=1e-5)
    flip = MultiCropConfig(**{**crops.__dict__, "flip_p": 1.0})
    g, _ = TensorMultiCrop(flip, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))(imgs, SampleRNG(0, 0, [0, 1, 2]))
    assert torch.allclose(g[1], imgs.flip(-1), atol=1e-5)


# ------------------------------------------------------------------------------------------------ ProSMin
def test_prosmin_networks_ema_and_centre():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    m = build_method(cfg)
    assert isinstance(m, ProSMin) and METHODS.get("prosmin") is ProSMin
    assert set(k.split(".")[0] for k in m.online.state_dict()) == {"backbone", "head", "predictor"}
    assert set(k.split(".")[0] for k in m.target.state_dict()) == {"backbone", "head"}
    online = dict(m.online.named_parameters())
    for n, p in m.target.named_parameters():  # target starts as the online copy, never trained
        assert torch.equal(p, online[n]) and not p.requires_grad
    assert m.target.backbone is not m.online.backbone  # the released code's shared-backbone bug is not repeated

    batch = make_batch(cfg)
    with torch.no_grad():  # the target's raw outputs on the global views (one batch, as BN in the head sees it)
        raw = m.target.head(m.target.backbone(torch.cat(batch.global_views)))
    loss, logs = m(batch, Progress(0, 10, 5))
    cm = cfg.method_config.center_momentum
    assert torch.allclose(m.center, (1 - cm) * raw.mean(0, keepdim=True), atol=1e-6)  # raw, not centred, outputs
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"s1", "s2", "sigma", "target_std"} <= set(logs)
    lam = cfg.method_config.lam
    assert loss.item() == pytest.approx(lam * float(logs["s1"]) + (1 - lam) * float(logs["s2"]), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in m.target.parameters())

    before = {n: p.detach().clone() for n, p in m.target.named_parameters()}
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(0.01)
    m.update_target(0.9)
    for n, p in m.target.named_parameters():
        assert torch.allclose(p, 0.9 * before[n] + 0.1 * online[n], atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_prosmin_sigma_is_exp_half_log_variance(normalize: bool):
    """mu = W_mu h, sigma = exp(0.5 W_s h); h = relu(normalize(mlp(.))) (released code) or mlp(.) (paper)."""
    cfg = tiny_cfg(**{"method.predictor_normalize": normalize})
    torch.manual_seed(1)
    net = ProSMinOnline(build_method(cfg).online.backbone, cfg.method_config).eval()
    x = torch.randn(5, 3, 32, 32)
    mu, sigma = net(x)
    h = net.predictor.mlp(net.head(net.backbone(x)))
    if normalize:
        h = torch.relu(h / h.norm(dim=-1, keepdim=True))
    assert torch.allclose(mu, h @ net.predictor.mu.weight.T, atol=1e-6)
    assert torch.allclose(sigma, torch.exp(0.5 * h @ net.predictor.log_var.weight.T), atol=1e-6)


def test_param_groups_exclude_biases_and_1d_from_weight_decay():
    m = build_method(tiny_cfg())
    decay, no_decay = m.param_groups()
    names = {id(p): n for n, p in m.online.named_parameters()}
    assert decay["apply_wd"] and not no_decay["apply_wd"] and no_decay["weight_decay"] == 0.0
    for p in no_decay["params"]:
        assert names[id(p)].endswith(".bias") or p.ndim == 1
    for p in decay["params"]:
        assert not names[id(p)].endswith(".bias") and p.ndim > 1
    n_trainable = sum(1 for p in m.online.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_schedules_follow_warmup_cosine_formulas():
    cfg = resolve_config("prosmin_micro", epochs=10, overrides={"optim.warmup_epochs": 2})
    s = make_schedules(cfg, steps_per_epoch=5)
    base = cfg.optim.lr * cfg.optim.batch_size / 256
    assert s.total_steps == 50 and s.warmup_steps == 10
    assert s.lr(0) == pytest.approx(base / 10) and s.lr(9) == pytest.approx(base)
    assert s.lr(10) == pytest.approx(base)  # cosine starts at the peak
    t = (30 - 10) / 40
    assert s.lr(30) == pytest.approx(cfg.optim.min_lr + 0.5 * (base - cfg.optim.min_lr) * (1 + np.cos(np.pi * t)))
    assert s.weight_decay(0) == pytest.approx(cfg.optim.weight_decay)
    assert s.weight_decay(50) == pytest.approx(cfg.optim.weight_decay_end)
    m = build_method(cfg)
    assert m.momentum_at(Progress(0, 50, 5)) == pytest.approx(cfg.method_config.momentum_start)
    assert m.momentum_at(Progress(50, 50, 5)) == pytest.approx(1.0)


def test_per_parameter_gradient_clipping_matches_dino():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.full((2, 2), 0.1)
    total = clip_gradients_per_parameter([a, b], clip=1.0)
    assert total == pytest.approx(math.sqrt(25 + 0.04))
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0, 0.0]) / (5 + 1e-6))  # clipped to norm 1
    assert torch.allclose(b.grad, torch.full((2, 2), 0.1))  # norm 0.2 < 1: untouched


# ---------------------------------------------------------------------------------------- loop + checkpoint
def test_pretrain_writes_a_loadable_checkpoint_and_log(tmp_path):
    from prosmin_bench import get_model
    from prosmin_bench.models.networks import build_predictive

    # the real vit_micro (what the registry builds for prosmin_micro), narrow heads, 3 steps
    ov = {k: v for k, v in TINY.items() if not k.startswith("arch_kwargs")}
    path = pretrain("prosmin_micro", epochs=1, out_dir=tmp_path, device="cpu",
                    overrides={**ov, "run.max_steps": 3})
    assert path == tmp_path / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("format", "format_version", "recipe", "method", "arch", "arch_kwargs", "config", "step", "target",
                "online", "optimizer", "schedules", "method_state", "rng"):
        assert key in ckpt
    assert ckpt["format"] == "prosmin-bench/pretrain" and ckpt["format_version"] == 1 and ckpt["step"] == 3
    assert ckpt["recipe"] == "prosmin_micro" and ckpt["method"] == "prosmin" and ckpt["arch"] == "vit_micro"
    assert "center" in ckpt["method_state"] and ckpt["config"]["optim"]["batch_size"] == 32
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2]
    for key in ("loss", "s1", "s2", "sigma", "lr", "wd", "momentum", "images_per_s"):
        assert all(math.isfinite(r[key]) for r in lines)

    # the model registry loads the ONLINE backbone strictly (ProSMin paper Sec. 6: "we freeze the encoder of the
    # online network"); its features are the checkpoint's online backbone
    model = get_model("prosmin_micro", weights=path)
    from prosmin_bench.models.architectures import build_architecture

    ref = build_architecture("vit_micro")
    ref.load_state_dict({k[len("backbone."):]: v for k, v in ckpt["online"].items() if k.startswith("backbone.")})
    ref.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model(x), ref(x), atol=1e-6)

    # the predictive module is the ONLINE network
    pred = build_predictive(ckpt)
    cfg = config_from_dict(ckpt["config"])
    online = ProSMinOnline(build_architecture("vit_micro", **cfg.arch_kwargs), cfg.method_config)
    online.load_state_dict(ckpt["online"])
    online.eval()
    mu, sigma = pred(x)
    mu_ref, sigma_ref = online(x)
    assert mu.shape == (4, 32) and torch.allclose(mu, mu_ref, atol=1e-6) and torch.allclose(sigma, sigma_ref, atol=1e-6)
    assert bool((sigma > 0).all())

    with pytest.raises(PretrainError, match="--resume"):  # never overwrite a run by accident
        pretrain("prosmin_micro", epochs=1, out_dir=tmp_path, device="cpu", overrides={**ov, "run.max_steps": 3})


def test_the_same_run_twice_writes_byte_identical_checkpoints(tmp_path):
    """Result records key on the checkpoint file's sha256: a re-made micro checkpoint must be the same file, or
    every committed record would be recomputed. Python's ``random`` state, saved for resume, is seeded too (it
    used to come from OS entropy). Drop path is on, so the torch generator is exercised."""
    import random

    from prosmin_bench.models.weights import sha256_file

    overrides = {**TINY, "run.max_steps": 2}
    digests = []
    for name in ("a", "b"):
        random.seed(name)  # whatever the process did before must not leak into the checkpoint
        digests.append(sha256_file(pretrain("prosmin_micro", epochs=1, out_dir=tmp_path / name, device="cpu",
                                            overrides=overrides)))
    assert digests[0] == digests[1]


def test_vits16_recipe_checkpoint_loads_strictly_as_prosmin_vits16(tmp_path):
    """The ImageNet recipe's architecture (ViT-S/16, 12 blocks) round-trips into the registry's prosmin_vits16;
    one step on the bundled digits with narrow heads and 64-px views keeps it fast on a CPU."""
    from prosmin_bench import get_model

    path = pretrain("prosmin_vits16_in1k", epochs=1, out_dir=tmp_path, device="cpu", overrides={
        "data.dataset": "digits", "data.num_workers": 0, "optim.batch_size": 2, "run.max_steps": 1,
        "crops.global_size": 64, "crops.local_crops": 1, "crops.local_size": 32, "method.out_dim": 16,
        "method.head_hidden_dim": 32, "method.head_bottleneck_dim": 8, "method.predictor_hidden_dim": 16,
    })
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "vit_small_patch16" and ckpt["step"] == 1
    model = get_model("prosmin_vits16", weights=path)
    assert model.embed_dim == 384
    online = {k[len("backbone."):]: v for k, v in ckpt["online"].items() if k.startswith("backbone.")}
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, online[k])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = ProSMin.forward

    def poisoned(self, batch, progress):
        loss, logs = real(self, batch, progress)
        return (loss * float("nan") if progress.step == 3 else loss), logs

    monkeypatch.setattr(ProSMin, "forward", poisoned)
    with pytest.raises(PretrainError, match="at step 3"):
        pretrain("prosmin_micro", epochs=1, out_dir=tmp_path, device="cpu",
                 overrides={**TINY, "run.max_steps": 6, "run.checkpoint_every_steps": 2})
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["online"].values())


def _run_cli(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ov = {**TINY, "optim.batch_size": 64, "run.max_steps": steps, "run.checkpoint_every_steps": 3}
    sets = [f"--set={k}={v}" for k, v in ov.items()]
    cmd = [sys.executable, "-m", "prosmin_bench.pretrain", "--recipe", "prosmin_micro", "--epochs", "2",
           "--out", str(out), "--device", "cpu", *sets, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_killed_then_resumed_run_equals_an_uninterrupted_run(tmp_path):
    """Tolerance: identical up to float32 round-off (1e-6 relative); on one CPU thread they are bitwise equal."""
    steps = 26  # crosses an epoch boundary (22 steps per epoch at batch 64)
    full, cut = tmp_path / "full", tmp_path / "cut"
    p_full = _run_cli(full, steps)
    p_cut = _run_cli(cut, steps)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and p_cut.poll() is None:
        ready = (cut / "checkpoint.pt").is_file() and (cut / "log.jsonl").is_file()
        if ready and len(_losses(cut)) >= 8:
            p_cut.send_signal(signal.SIGKILL)  # no chance to clean up: a real crash
            p_cut.wait()
            killed_at = max(_losses(cut))
            break
        time.sleep(0.02)
    assert killed_at is not None and killed_at < steps - 1, "the run finished before it could be killed"
    saved = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    assert 3 <= saved < steps
    resumed = _run_cli(cut, steps, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()[-2000:]
    assert p_full.wait(timeout=300) == 0, p_full.stdout.read().decode()[-2000:]
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(steps))
    np.testing.assert_allclose([b[s] for s in range(steps)], [a[s] for s in range(steps)], rtol=1e-6, atol=1e-8)
    ca = torch.load(full / "checkpoint.pt", map_location="cpu", weights_only=True)
    cb = torch.load(cut / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ca["step"] == cb["step"] == steps
    for part in ("online", "target", "method_state"):
        for k, v in ca[part].items():
            torch.testing.assert_close(cb[part][k], v, rtol=1e-6, atol=1e-7)
