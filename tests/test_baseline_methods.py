"""DINO, iBOT and MoCo-v3 pretraining methods (issue 4, item 4) against direct formulas and loops.

References are written here from the official code's formulas (DINO ``main_dino.py`` ``DINOLoss``, iBOT
``main_ibot.py`` ``iBOTLoss`` and ``loader.py``, MoCo-v3 ``moco/builder.py`` and ``vits.py``), as loops over views,
pairs and samples, independently of the vectorised implementations.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
from prosmin_bench.errors import WeightsError
from prosmin_bench.pretrain import pretrain, resolve_config
from prosmin_bench.pretrain.augment import TensorMultiCrop
from prosmin_bench.pretrain.config import ConfigError, PretrainConfig
from prosmin_bench.pretrain.methods import METHODS, MultiCropBatch, Progress
from prosmin_bench.pretrain.methods.dino import DINO, dino_cross_entropy, teacher_temperature
from prosmin_bench.pretrain.methods.ibot import IBOT, block_mask, draw_masks, ibot_patch_loss, vit_tokens
from prosmin_bench.models.architectures import sincos_2d_position_embedding
from prosmin_bench.pretrain.methods.mocov3 import MoCoV3, info_nce
from prosmin_bench.pretrain.recipes import get_recipe
from prosmin_bench.pretrain.rng import SampleRNG
from prosmin_bench.pretrain.train import build_method

REPO = Path(__file__).resolve().parents[1]

#: Tiny configs: one-block 32-wide ViT, narrow heads, batch 16 (a step takes well under a second).
ARCH = {"arch_kwargs.depth": 1, "arch_kwargs.embed_dim": 32, "arch_kwargs.num_heads": 2}
HEADS = {
    "dino_micro": {"method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16},
    "ibot_micro": {"method.out_dim": 32, "method.patch_out_dim": 32, "method.head_hidden_dim": 64,
                   "method.head_bottleneck_dim": 16},
    "mocov3_micro": {"method.dim": 16, "method.mlp_dim": 32},
    "prosmin_micro": {"method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16,
                      "method.predictor_hidden_dim": 64},
}
RUN = {"optim.batch_size": 16, "optim.warmup_epochs": 0.1}
MICRO = ("dino_micro", "ibot_micro", "mocov3_micro")


def tiny_cfg(recipe: str, arch: bool = True, **extra) -> PretrainConfig:
    return resolve_config(recipe, epochs=1, overrides={**(ARCH if arch else {}), **HEADS[recipe], **RUN, **extra})


def make_batch(cfg: PretrainConfig, b: int = 8, epoch: int = 0) -> MultiCropBatch:
    from prosmin_bench.data.bundled import load_digits_split

    images = torch.from_numpy(load_digits_split("train").images[:b].transpose(0, 3, 1, 2).copy()).float() / 255
    rng = SampleRNG(cfg.run.seed, epoch, list(range(b)))
    g, l = TensorMultiCrop(cfg.crops, cfg.data.mean, cfg.data.std)(images, rng)
    return MultiCropBatch(g, l, torch.arange(b), rng)


# ------------------------------------------------------------------------------------------ the loss formulas
def dino_loss_loop(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, s_temp: float,
                   t_temp: float, n_glob: int) -> float:
    """DINOLoss.forward as a loop: student [V * b, K], teacher [G * b, K] raw outputs."""
    s = (student / s_temp).chunk(student.shape[0] // teacher.shape[0] * n_glob)
    t = F.softmax((teacher - center) / t_temp, dim=-1).chunk(n_glob)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(len(s)):
            if v == iq:
                continue
            total += float(torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean())
            n += 1
    return total / n


def test_dino_cross_entropy_matches_the_dino_loss_loop():
    torch.manual_seed(0)
    V, G, b, K = 6, 2, 5, 11
    student, teacher, center = torch.randn(V * b, K), torch.randn(G * b, K), torch.randn(1, K)
    t_probs = F.softmax((teacher - center) / 0.04, dim=-1).reshape(G, b, K)
    got, n_pairs = dino_cross_entropy((student / 0.1).reshape(V, b, K), t_probs)
    assert n_pairs == G * V - G
    assert got.item() == pytest.approx(dino_loss_loop(student, teacher, center, 0.1, 0.04, G), rel=1e-5)


def test_teacher_temperature_follows_dinos_linspace_schedule():
    start, end, warm, epochs = 0.04, 0.07, 30, 100
    ref = np.concatenate((np.linspace(start, end, warm), np.ones(epochs - warm) * end))
    got = [teacher_temperature(start, end, warm, e) for e in range(epochs)]
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert teacher_temperature(0.04, 0.07, 0, 0) == 0.07


def test_ibot_patch_loss_matches_a_loop_over_views_and_images():
    torch.manual_seed(1)
    G, b, P, K = 2, 4, 9, 7
    s, t = torch.randn(G, b, P, K), F.softmax(torch.randn(G, b, P, K), dim=-1)
    masks = torch.rand(G, b, P) < 0.4
    masks[0, 0] = False  # an image without masked patches contributes 0
    total = 0.0
    for g in range(G):
        per_image = []
        for i in range(b):
            ce = [float(-(t[g, i, p] * F.log_softmax(s[g, i, p], dim=-1)).sum()) for p in range(P) if masks[g, i, p]]
            per_image.append(sum(ce) / max(len(ce), 1))
        total += sum(per_image) / b
    assert ibot_patch_loss(s, t, masks).item() == pytest.approx(total / G, rel=1e-5)


def test_info_nce_matches_a_loop_with_the_mocov3_scaling():
    torch.manual_seed(2)
    q, k, T = torch.randn(4, 6), torch.randn(8, 6), 0.2
    offset = 4  # this process's positives are keys 4..7 of the gathered batch
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    ref = 0.0
    for i in range(4):
        logits = [float(qn[i] @ kn[j]) / T for j in range(8)]
        ref += -(logits[i + offset] - math.log(sum(math.exp(x) for x in logits)))
    assert info_nce(q, k, T, offset).item() == pytest.approx(2 * T * ref / 4, rel=1e-5)


def test_sincos_position_embedding_matches_mocov3_vits():
    """vits.py build_2d_sincos_position_embedding, transcribed: meshgrid(w, h) ('ij'), [sin w, cos w, sin h, cos h]."""
    h = w = 5
    dim, temperature = 16, 10000.0
    grid_w, grid_h = torch.meshgrid(torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    ref = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    ref = torch.cat([torch.zeros(1, 1, dim), ref], dim=1)
    torch.testing.assert_close(sincos_2d_position_embedding((h, w), dim), ref)


# --------------------------------------------------------------------------------------------------- masks
def test_block_masks_reach_the_ratio_without_exceeding_it():
    cfg = tiny_cfg("ibot_micro").method_config
    rng = SampleRNG(0, 0, list(range(200)))
    masks = draw_masks(rng, 2, (8, 8), cfg)  # pred_ratio 0.3 (main_ibot.py default), no jitter
    counts = masks.sum(-1).float()
    assert masks.shape == (2, 200, 64)
    assert counts.max() <= 0.3 * 64  # BEiT never adds a block that would exceed the goal
    assert counts.mean() / 64 == pytest.approx(0.3, abs=0.05)
    assert torch.equal(masks, draw_masks(SampleRNG(0, 0, list(range(200))), 2, (8, 8), cfg))  # per-image draws
    assert not torch.equal(masks[:, :100], masks[:, 100:])
    one = draw_masks(SampleRNG(0, 0, [7]), 2, (8, 8), cfg)
    assert torch.equal(one[:, 0], masks[:, 7])  # an image's mask does not depend on the rest of the batch


def test_block_mask_blocks_are_rectangles_of_the_minimum_area():
    """One round of BEiT's masking adds one rectangle of area >= (min(H, W) // 3)^2."""
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        u = torch.rand(32 * 10 * 4, generator=g).tolist()
        m = block_mask(u, (14, 14), 0.3, (math.log(0.3), math.log(1 / 0.3)))
        assert 16 <= int(m.sum()) <= int(0.3 * 196)
        rows, cols = m.any(1).nonzero(), m.any(0).nonzero()
        assert len(rows) and len(cols)


def test_ratio_list_with_zero_and_rand_shape():
    cfg = tiny_cfg("ibot_micro", **{"method.pred_ratio": "0,0.3", "method.pred_ratio_var": "0,0.2"}).method_config
    counts = draw_masks(SampleRNG(0, 0, list(range(400))), 1, (8, 8), cfg).sum(-1).float()[0]
    assert (counts == 0).float().mean().item() == pytest.approx(0.5, abs=0.1)  # random.choice([0, U(0.1, 0.5)])
    assert counts.max() <= 0.5 * 64
    rand = tiny_cfg("ibot_micro", **{"method.pred_shape": "rand"}).method_config
    counts = draw_masks(SampleRNG(0, 0, list(range(20))), 2, (8, 8), rand).sum(-1)
    assert bool((counts == int(0.3 * 64)).all())


def test_masked_vit_tokens():
    cfg = tiny_cfg("ibot_micro")
    m = build_method(cfg).eval()
    bb = m.online.backbone
    x = torch.randn(3, 3, 32, 32)
    none = torch.zeros(3, 64, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(vit_tokens(bb, x), bb.forward_features(x))
        torch.testing.assert_close(vit_tokens(bb, x, none, m.online.mask_token), bb.forward_features(x))
        # a masked patch whose embedding is replaced by itself leaves everything unchanged
        emb = bb.patch_embed(x).reshape(3, 64, -1)
        mask = none.clone()
        mask[1, 5] = True
        same = vit_tokens(bb, x, mask, emb[1, 5][None])
        torch.testing.assert_close(same, bb.forward_features(x))
        changed = vit_tokens(bb, x, mask, emb[1, 5][None] + 1.0)
    assert torch.equal(changed[[0, 2]], same[[0, 2]]) and not torch.allclose(changed[1], same[1])


# ------------------------------------------------------------------------------------------ methods, wired
def test_dino_forward_is_the_dino_loss_of_its_networks_and_centres_raw_outputs():
    cfg = tiny_cfg("dino_micro", **{"crops.local_crops": 2})
    m = build_method(cfg)
    assert isinstance(m, DINO) and METHODS.get("dino") is DINO
    batch = make_batch(cfg)
    m.center.normal_()
    c0 = m.center.clone()
    progress = Progress(step=0, total_steps=10, steps_per_epoch=5)
    torch.manual_seed(5)
    loss, logs = m(batch, progress)
    with torch.no_grad():
        torch.manual_seed(5)  # the same drop-path draws
        t = m.target.head(m.target.backbone(torch.cat(batch.global_views)))
        # one head call over all views' features, as the method (the head's BN sees them together)
        s = m.online.head(torch.cat([m.online.backbone(torch.cat(batch.global_views)),
                                     m.online.backbone(torch.cat(batch.local_views))]))
    c = cfg.method_config
    temp = teacher_temperature(c.teacher_temp_start, c.teacher_temp, c.teacher_temp_warmup_epochs, 0)
    ref = dino_loss_loop(s, t, c0, c.student_temp, temp, 2)
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True))
    assert set(logs) == {"teacher_temp", "teacher_entropy", "kl", "target_std"}
    loss.backward()
    assert all(p.grad is None for p in m.target.parameters())
    assert m.online.head.last_layer.weight_v.grad is not None


def test_ibot_forward_is_cls_plus_masked_patch_distillation():
    cfg = tiny_cfg("ibot_micro", **{"crops.local_crops": 2, "method.shared_head": False,
                                    "method.drop_path_rate": 0.0, "method.head_use_bn": False})
    m = build_method(cfg)
    assert isinstance(m, IBOT) and hasattr(m.online.head, "patch") and not hasattr(m.target.head, "patch")
    batch = make_batch(cfg)
    progress = Progress(step=0, total_steps=10, steps_per_epoch=5)
    loss, logs = m(batch, progress)
    c = cfg.method_config
    masks = draw_masks(batch.rng, 2, (8, 8), c)
    glob = torch.cat(batch.global_views)
    with torch.no_grad():
        t_tok = m.target.backbone.forward_features(glob)
        t_z = F.normalize(m.target.head.mlp(t_tok), dim=-1)
        t_cls, t_patch = m.target.head.last_layer(t_z[:, 0]), m.target.head.last_layer(t_z[:, 1:])  # shared
        s_tok = vit_tokens(m.online.backbone, glob, masks.reshape(16, -1), m.online.mask_token)
        s_z = F.normalize(m.online.head.mlp(s_tok), dim=-1)
        s_cls = m.online.head.last_layer(s_z[:, 0])
        s_patch = m.online.head.patch.last_layer(s_z[:, 1:])
        s_loc = m.online.head(m.online.backbone(torch.cat(batch.local_views)))
    temp = teacher_temperature(c.teacher_temp_start, c.teacher_temp, c.teacher_temp_warmup_epochs, 0)
    temp_patch = teacher_temperature(c.teacher_patch_temp_start, c.teacher_patch_temp, c.teacher_temp_warmup_epochs, 0)
    ref_cls = dino_loss_loop(torch.cat([s_cls, s_loc]), t_cls, torch.zeros(1, 32), 0.1, temp, 2)
    t_p = F.softmax(t_patch / temp_patch, dim=-1).reshape(2, 8, 64, -1)
    ref_patch = ibot_patch_loss((s_patch / 0.1).reshape(2, 8, 64, -1), t_p, masks)
    assert logs["cls"].item() == pytest.approx(ref_cls, rel=1e-4)
    assert logs["patch"].item() == pytest.approx(ref_patch.item(), rel=1e-4)
    assert loss.item() == pytest.approx(ref_cls + ref_patch.item(), rel=1e-4)
    torch.testing.assert_close(m.center_patch, 0.1 * t_patch.mean(1).mean(0)[None, None])
    loss.backward()
    assert m.online.mask_token.grad is not None and m.online.mask_token.grad.abs().sum() > 0
    # the patch head's last layer is nested so the loop's first-epoch freezing of `.last_layer.` covers it
    assert "head.patch.last_layer.weight_v" in dict(m.online.named_parameters())


def test_mocov3_forward_is_the_symmetric_scaled_info_nce():
    cfg = tiny_cfg("mocov3_micro")
    m = build_method(cfg)
    assert isinstance(m, MoCoV3) and cfg.crops.local_crops == 0
    batch = make_batch(cfg)
    loss, logs = m(batch, Progress(step=0, total_steps=10, steps_per_epoch=5))
    x1, x2 = batch.global_views
    with torch.no_grad():
        q1, q2 = m.online(x1), m.online(x2)
        k1, k2 = m.target(x1), m.target(x2)
    T = cfg.method_config.temperature
    ref = info_nce(q1, k2, T) + info_nce(q2, k1, T)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    loss.backward()
    bb = m.online.backbone
    assert not bb.patch_embed.proj.weight.requires_grad and bb.patch_embed.proj.weight.grad is None  # stop-grad-conv1
    assert not bb.pos_embed.requires_grad
    torch.testing.assert_close(bb.pos_embed.detach(), sincos_2d_position_embedding((8, 8), 32))
    groups = m.param_groups()
    assert len(groups) == 1 and groups[0]["apply_wd"]  # main_moco.py: AdamW(model.parameters()) decays everything


@pytest.mark.parametrize("recipe", ("prosmin_micro", *MICRO))
@pytest.mark.parametrize("on", (True, False))
def test_vit_stabilisers_freeze_the_patch_projection_and_fix_sincos_positions(recipe, on):
    """MoCo-v3's stop-grad-conv1 and sin-cos position embedding, available to every method: with them on, an
    optimiser step leaves the patch projection and the position embedding where they started (online and
    target), and the position embedding is vits.py's table; with them off, both are trained."""
    flags = {"method.stop_grad_conv1": on, "method.sincos_pos_embed": on, "method.drop_path_rate": 0.0}
    cfg = tiny_cfg(recipe, **flags)
    torch.manual_seed(0)
    m = build_method(cfg)
    bb = m.online.backbone
    before = {n: p.detach().clone() for n, p in bb.named_parameters() if n.startswith(("patch_embed.", "pos_embed"))}
    if on:
        torch.testing.assert_close(bb.pos_embed.detach(), sincos_2d_position_embedding((8, 8), 32))
    opt = torch.optim.AdamW(m.param_groups(), lr=1e-2)
    loss, _ = m(make_batch(cfg, b=16), Progress(step=0, total_steps=10, steps_per_epoch=5))
    loss.backward()
    opt.step()
    m.update_target(0.5)
    for name, old in before.items():
        same = torch.equal(dict(bb.named_parameters())[name].detach(), old)
        assert same == on, (name, on)
        if on:
            torch.testing.assert_close(dict(m.target.backbone.named_parameters())[name], old)


def test_vit_stabilisers_need_a_vit():
    cfg = tiny_cfg("dino_micro", **{"method.sincos_pos_embed": True, "arch_kwargs.class_token": False,
                                    "arch_kwargs.global_pool": "avg"})
    needs = "sincos_pos_embed: a fixed sin-cos position embedding needs a ViT with one \\[CLS\\] token"
    with pytest.raises(ConfigError, match=needs):
        build_method(cfg)


def test_mocov3_networks_use_the_official_mlp_layout():
    """moco/builder.py _build_mlp: projector head.{0,1,3,4,6,7}, predictor predictor.{0,1,3,4}, last BN affine-free."""
    m = build_method(tiny_cfg("mocov3_micro"))
    keys = {k for k in m.online.state_dict() if not k.startswith("backbone.")}
    bn = ("running_mean", "running_var", "num_batches_tracked")
    expected = {"head.0.weight", "head.3.weight", "head.6.weight", "predictor.0.weight", "predictor.3.weight"}
    expected |= {f"{p}.{s}" for p in ("head.1", "head.4", "predictor.1") for s in ("weight", "bias", *bn)}
    expected |= {f"{p}.{s}" for p in ("head.7", "predictor.4") for s in bn}
    assert keys == expected
    assert set(m.target.state_dict()) == {k for k in m.online.state_dict() if not k.startswith("predictor.")}


@pytest.mark.parametrize("recipe", MICRO)
def test_target_is_the_ema_of_the_online_network(recipe):
    m = build_method(tiny_cfg(recipe))
    assert all(not p.requires_grad for p in m.target.parameters())
    online = {n: p.detach().clone() for n, p in m.online.named_parameters()}
    before = {n: p.detach().clone() for n, p in m.target.named_parameters()}
    with torch.no_grad():
        for p in m.online.parameters():
            p.add_(0.5)
    m.update_target(0.9)
    for n, p in m.target.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * (online[n] + 0.5))


@pytest.mark.parametrize("recipe", MICRO)
def test_student_learns_the_teachers_targets_on_one_batch(recipe):
    """The gradient points the right way: with the teacher held fixed (no EMA step; DINO's and iBOT's centres set to
    the batch mean at once, momentum 0), the loss on one batch falls. (With the EMA on, DINO's loss on one batch
    first drops to ~0 by a one-hot collapse that the centring then undoes: not monotone, by design.)"""
    extra = {} if recipe == "mocov3_micro" else {"method.center_momentum": 0.0}
    if recipe == "ibot_micro":
        extra["method.center_momentum_patch"] = 0.0
    cfg = tiny_cfg(recipe, **{"method.drop_path_rate": 0.0, **extra})
    torch.manual_seed(0)
    m = build_method(cfg)
    batch = make_batch(cfg, b=16)
    opt = torch.optim.AdamW(m.param_groups(), lr=1e-3, weight_decay=0.0)
    losses = []
    for step in range(30):
        loss, _ = m(batch, Progress(step=step, total_steps=1000, steps_per_epoch=100))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[1:6]), losses


def test_config_checks():
    with pytest.raises(ConfigError, match="two-view"):
        tiny_cfg_method = tiny_cfg("mocov3_micro", **{"crops.global_crops": 3})
        build_method(tiny_cfg_method)
    with pytest.raises(ConfigError, match="local crops"):
        build_method(tiny_cfg("mocov3_micro", **{"crops.local_crops": 2}))
    with pytest.raises(ConfigError, match="pred_ratio"):
        build_method(tiny_cfg("ibot_micro", **{"method.pred_ratio": "0.3,0.1"}))
    with pytest.raises(ConfigError, match="patch_out_dim"):
        build_method(tiny_cfg("ibot_micro", **{"method.patch_out_dim": 16}))
    with pytest.raises(ConfigError, match="teacher_temp"):
        build_method(tiny_cfg("dino_micro", **{"method.teacher_temp": 0}))


# -------------------------------------------------------------------------------------------------- recipes
def test_micro_recipes_share_prosmin_micros_data_crops_and_optimiser():
    base = get_recipe("prosmin_micro").config
    for name in MICRO:
        cfg = get_recipe(name).config
        assert get_recipe(name).scale == "mini" and cfg.method == name.split("_")[0] and cfg.recipe == name
        assert (cfg.arch, cfg.arch_kwargs, cfg.data, cfg.optim, cfg.run) == (
            base.arch, base.arch_kwargs, base.data, base.optim, base.run)
        if name == "mocov3_micro":  # the same two global views; MoCo-v3 takes no local crops
            assert cfg.crops.local_crops == 0
            assert {k: v for k, v in vars(cfg.crops).items() if k != "local_crops"} == {
                k: v for k, v in vars(base.crops).items() if k != "local_crops"}
        else:
            assert cfg.crops == base.crops


def test_imagenet_recipes_use_the_papers_values():
    dino = get_recipe("dino_vits16_in1k").config
    assert (dino.method_config.out_dim, dino.method_config.teacher_temp, dino.method_config.student_temp) == (
        65536, 0.07, 0.1)
    assert (dino.method_config.momentum_start, dino.method_config.center_momentum) == (0.996, 0.9)
    assert (dino.optim.epochs, dino.optim.batch_size, dino.crops.local_crops) == (800, 1024, 10)
    ibot = get_recipe("ibot_vits16_in1k").config.method_config
    assert (ibot.out_dim, ibot.shared_head, ibot.lambda_cls, ibot.lambda_patch) == (8192, True, 1.0, 1.0)
    assert (ibot.pred_ratio, ibot.pred_ratio_var) == ((0.0, 0.3), (0.0, 0.2))
    moco = get_recipe("mocov3_vits16_in1k").config
    assert moco.arch_kwargs["num_heads"] == 12 and moco.crops.local_crops == 0
    mc = moco.method_config
    assert (mc.temperature, mc.momentum_start, mc.dim, mc.mlp_dim) == (0.2, 0.99, 256, 4096)
    o = moco.optim
    assert (o.lr, o.batch_size, o.epochs, o.warmup_epochs, o.weight_decay) == (1.5e-4, 4096, 300, 40, 0.1)
    for name in ("dino_vits16_in1k", "ibot_vits16_in1k", "mocov3_vits16_in1k"):
        m = build_method(get_recipe(name).config)  # the full-size networks build
        assert m.online.backbone.embed_dim == 384


# ----------------------------------------------------------------------------------- loop and model registry
@pytest.mark.parametrize("recipe", MICRO)
def test_pretraining_checkpoint_loads_as_the_registered_micro_model(tmp_path, recipe):
    from prosmin_bench import get_model
    from prosmin_bench.models.architectures import build_architecture

    ov = {**HEADS[recipe], **RUN, "run.max_steps": 2}
    path = pretrain(recipe, epochs=1, out_dir=tmp_path, device="cpu", overrides=ov)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["method"] == recipe.split("_")[0] and ckpt["step"] == 2
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1] and all(math.isfinite(r["loss"]) for r in lines)
    model = get_model(recipe, weights=path)
    # MoCo-v3 is evaluated with its base (online) encoder, as its main_lincls.py does; the others with the target
    # network, as DINO and iBOT evaluate their teacher
    network = "online" if recipe == "mocov3_micro" else "target"
    assert model.network == network

    def backbone(net: str):
        ref = build_architecture("vit_micro")
        ref.load_state_dict({k[len("backbone."):]: v for k, v in ckpt[net].items() if k.startswith("backbone.")})
        return ref.eval()

    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), backbone(network)(x))
    other_net = {"online": "target", "target": "online"}[network]
    assert not torch.allclose(model(x), backbone(other_net)(x))  # two steps apart: the test can tell them apart
    other = "dino_micro" if recipe != "dino_micro" else "mocov3_micro"
    with pytest.raises(WeightsError, match=f"is a {recipe.split('_')[0]} checkpoint"):
        get_model(other, weights=path)


# ---------------------------------------------------------------------------------------------------- DDP
DDP_STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_overrides(recipe: str) -> dict:
    # no drop path: its masks come from each process's own generator (the one legitimate difference); no BN in
    # the head: DDP turns BN into SyncBatchNorm, which PyTorch runs on GPUs only
    return {**ARCH, **HEADS[recipe], **RUN, "crops.local_crops": 2, "method.drop_path_rate": 0.0,
            "method.head_use_bn": False, "run.max_steps": DDP_STEPS}


def worker(out: Path, recipe: str) -> None:
    from prosmin_bench import distributed

    torch.set_num_threads(1)
    pretrain(recipe, epochs=1, out_dir=out / recipe, device="cpu", overrides=_ddp_overrides(recipe))
    distributed.destroy()


@pytest.mark.parametrize("recipe", ["dino_micro", "ibot_micro"])
def test_two_process_gloo_run_matches_one_process(tmp_path, recipe):
    """DINO's and iBOT's centres are all-reduced, so 2 x 8 images per step give one process's 16-image run.
    (MoCo-v3's BN layers become SyncBatchNorm under DDP, which PyTorch supports on GPUs only.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(Path(__file__)), str(tmp_path / "ddp"),
           recipe]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    single = tmp_path / "single" / recipe
    pretrain(recipe, epochs=1, out_dir=single, device="cpu", overrides=_ddp_overrides(recipe))
    a = torch.load(single / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "ddp" / recipe / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert b["world_size"] == 2 and a["step"] == b["step"] == DDP_STEPS
    la = [json.loads(x)["loss"] for x in (single / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / recipe / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    for part in ("online", "target", "method_state"):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, atol=1e-4, rtol=0)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
