"""Pretraining fidelity (issue 19 items 4-6): MoCo-v3's ViT initialisation before the first step, DINO's position
embedding interpolation for local crops, and ProSMin's paper-text augmentation recipe.

References are written out here from the upstream sources: facebookresearch/moco-v3 ``vits.py`` lines 31-47 (the
init) and facebookresearch/dino ``vision_transformer.py`` lines 174-194 (``interpolate_pos_encoding``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
from prosmin_bench.models import get_model, get_model_spec
from prosmin_bench.models.architectures import (build_architecture, dino_interpolate_pos_encoding, mocov3_init_,
                                                sincos_2d_position_embedding, use_dino_pos_interpolation)
from prosmin_bench.pretrain import resolve_config
from prosmin_bench.pretrain.config import ConfigError
from prosmin_bench.pretrain.recipes import get_recipe
from prosmin_bench.pretrain.train import build_method

TINY_HEADS = {"method.out_dim": 32, "method.head_hidden_dim": 64, "method.head_bottleneck_dim": 16}


def _uniform_checks(w: torch.Tensor, bound: float, where: str) -> None:
    """``w`` ~ uniform(-bound, bound): inside the bound, reaching close to it, std bound / sqrt(3)."""
    assert w.abs().max().item() <= bound * (1 + 1e-6), where
    assert w.abs().max().item() > 0.97 * bound, where  # a narrower init (e.g. plain xavier on [3D, D]) fails here
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.06), where


def _check_mocov3_init(bb: nn.Module, frozen: bool | None) -> None:
    """vits.py's init on ``bb``; ``frozen``: whether the patch projection must be frozen (None: not checked)."""
    dim = bb.embed_dim
    p = bb.patch_embed.patch_size[0]
    proj = bb.patch_embed.proj
    # vits.py lines 45-47: val = sqrt(6 / (3 * p * p + D)), uniform(-val, val), zero bias
    assert torch.count_nonzero(proj.bias).item() == 0
    _uniform_checks(proj.weight.detach(), math.sqrt(6.0 / (3 * p * p + dim)), "patch_embed.proj")
    if frozen is not None:
        assert proj.weight.requires_grad is not frozen and proj.bias.requires_grad is not frozen
    for name, m in bb.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        assert torch.count_nonzero(m.bias).item() == 0, name  # line 40
        w = m.weight.detach()
        if "qkv" in name:  # lines 34-37: each of Q, K, V a [D, D] xavier block, bound sqrt(6 / (D + D))
            assert w.shape == (3 * dim, dim)
            for block in w.chunk(3):
                _uniform_checks(block, math.sqrt(6.0 / (dim + dim)), name)
            assert w.abs().max().item() > math.sqrt(6.0 / (3 * dim + dim)) * 1.3  # not one [3D, D] xavier matrix
        else:  # line 39: xavier_uniform, bound sqrt(6 / (fan_in + fan_out))
            _uniform_checks(w, math.sqrt(6.0 / (w.shape[0] + w.shape[1])), name)
    assert bb.cls_token.detach().abs().max().item() < 1e-5  # line 41: normal(std 1e-6)


@pytest.mark.parametrize("recipe", ["mocov3_micro", "prosmin_micro", "prosmin_paperaug_micro", "dino_micro"])
def test_micro_recipes_start_from_mocov3_init(recipe):
    """Before the first step: the online backbone has vits.py's init with the frozen patch projection, and the
    target starts as its copy."""
    cfg = get_recipe(recipe).config
    assert cfg.method_config.stop_grad_conv1 and cfg.method_config.mocov3_init
    torch.manual_seed(0)
    m = build_method(cfg)
    _check_mocov3_init(m.online.backbone, frozen=True)
    torch.testing.assert_close(m.online.backbone.pos_embed.detach(), sincos_2d_position_embedding((8, 8), 96))
    online = dict(m.online.backbone.named_parameters())
    for name, p in m.target.backbone.named_parameters():
        assert torch.equal(p, online[name]), name


def test_mocov3_init_vit_small_matches_the_issue_numbers():
    """ViT-S/16 (p = 16, D = 384): patch projection bound sqrt(6 / 1152) = 0.0722, std 0.0417 (PyTorch's default
    conv init, kaiming_uniform(a = sqrt 5) over fan-in 768, has std 1 / sqrt(3 * 768) = 0.0208 and a bias)."""
    torch.manual_seed(0)
    vit = build_architecture("vit_small_patch16", num_heads=12, drop_path_rate=0.0)
    default = nn.Conv2d(3, 384, 16, 16)
    assert default.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 768), rel=0.05)
    mocov3_init_(vit)
    _check_mocov3_init(vit, frozen=False)
    assert vit.patch_embed.proj.weight.std().item() == pytest.approx(0.0417, abs=5e-4)


def test_stop_grad_conv1_without_mocov3_init_warns(caplog):
    cfg = resolve_config("prosmin_micro", epochs=1, overrides={**TINY_HEADS, "method.predictor_hidden_dim": 64,
                                                                "method.mocov3_init": False})
    with caplog.at_level("WARNING"):
        m = build_method(cfg)
    assert "method.mocov3_init=true" in caplog.text
    assert m.online.backbone.patch_embed.proj.bias.abs().sum() > 0  # timm's (PyTorch's) default init


def test_random_sincos_micro_is_the_micro_recipes_starting_point():
    """The reference model has the same init as the recipes: vits.py's statistics and the sin-cos table."""
    spec = get_model_spec("random_sincos_micro")
    assert spec.weights.init == "mocov3"
    net = get_model("random_sincos_micro").net
    _check_mocov3_init(net, frozen=None)  # an evaluated model: nothing in it trains
    torch.testing.assert_close(net.pos_embed.detach(), sincos_2d_position_embedding((8, 8), 96))
    assert get_model("random_sincos_micro").weights_sha256 == get_model("random_sincos_micro").weights_sha256


# --------------------------------------------------------------------------------- position interpolation
def _dino_reference(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """vision_transformer.py interpolate_pos_encoding (lines 174-194) written out; (w, h) as DINO reads
    ``B, nc, w, h = x.shape``, i.e. w is the image's first spatial size."""
    n = pos_embed.shape[1] - 1
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    side = int(math.sqrt(n))
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("size, native, patch", [((96, 96), 224, 16), ((96, 64), 224, 16), ((16, 16), 32, 4)])
def test_dino_interpolation_is_dinos_formula_and_differs_from_timm(size, native, patch):
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(0)
    n = (native // patch) ** 2
    pos = torch.randn(1, 1 + n, 48, generator=g)
    ours = dino_interpolate_pos_encoding(pos, size[0], size[1], patch)
    ref = _dino_reference(pos, size[0], size[1], patch)
    assert ours.shape == (1, 1 + (size[0] // patch) * (size[1] // patch), 48)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    timm_pos = resample_abs_pos_embed(pos, new_size=(size[0] // patch, size[1] // patch), num_prefix_tokens=1)
    assert timm_pos.shape == ours.shape
    assert (timm_pos - ours).abs().max().item() > 1e-2  # antialiasing and the + 0.1 scale: not the same table
    assert torch.equal(dino_interpolate_pos_encoding(pos, native, native, patch), pos)  # native size: as it is


def test_dino_pos_interpolation_in_the_network_forward():
    """A vit_micro with DINO's rule: a 16-px crop's tokens get DINO's table (checked on ``_pos_embed``), the whole
    forward differs from timm's rule only through it, and the 32-px forward and the state dict are timm's."""
    torch.manual_seed(0)
    plain = build_architecture("vit_micro", dynamic_img_size=True, drop_path_rate=0.0).eval()
    dino = copy.deepcopy(plain)
    use_dino_pos_interpolation(dino)
    assert type(dino).__name__ == "DinoPosEmbedViT" and dino.state_dict().keys() == plain.state_dict().keys()
    x16 = torch.randn(2, 3, 16, 16)
    tokens = plain.patch_embed(x16)  # [2, 4, 4, 96] with dynamic_img_size
    want = torch.cat([plain.cls_token.expand(2, -1, -1), tokens.reshape(2, 16, 96)], 1)
    want = want + dino_interpolate_pos_encoding(plain.pos_embed, 16, 16, 4)
    torch.testing.assert_close(dino._pos_embed(tokens), want)
    with torch.no_grad():
        ref = plain.norm(plain.blocks(want))[:, 0]  # the forward with DINO's table, by hand
        torch.testing.assert_close(dino(x16), ref)
        assert (dino(x16) - plain(x16)).abs().max().item() > 1e-4
        x32 = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(dino(x32), plain(x32), rtol=0, atol=0)
    assert type(pickle.loads(pickle.dumps(dino))) is type(dino)


def test_pos_interp_knob_reaches_both_backbones_and_is_checked():
    base = {**TINY_HEADS, "arch_kwargs.depth": 1}
    m = build_method(resolve_config("dino_micro", epochs=1, overrides={**base, "method.pos_interp": "dino"}))
    assert type(m.online.backbone).__name__ == "DinoPosEmbedViT" and type(m.target.backbone) is type(m.online.backbone)
    with pytest.raises(ConfigError, match="method.pos_interp to be one of"):
        build_method(resolve_config("dino_micro", epochs=1, overrides={**base, "method.pos_interp": "nearest"}))
    with pytest.raises(ConfigError, match="dynamic_img_size"):
        build_method(resolve_config("dino_micro", epochs=1, overrides={
            **base, "method.pos_interp": "dino", "arch_kwargs.dynamic_img_size": False}))


@pytest.mark.parametrize("recipe", ["dino_vits16_in1k", "ibot_vits16_in1k", "prosmin_vits16_in1k"])
def test_imagenet_multicrop_recipes_use_dinos_interpolation(recipe):
    cfg = get_recipe(recipe).config
    assert cfg.method_config.pos_interp == "dino" and cfg.arch_kwargs["dynamic_img_size"] and cfg.crops.local_crops


def test_micro_recipes_keep_timms_rule_and_have_no_local_crops():
    """The micro recipes feed one size (no local crops), where both rules add the table as it is."""
    for recipe in ("prosmin_micro", "dino_micro", "ibot_micro", "mocov3_micro", "prosmin_paperaug_micro"):
        cfg = get_recipe(recipe).config
        assert cfg.method_config.pos_interp == "timm" and cfg.crops.local_crops == 0


# --------------------------------------------------------------------------------- paper-text augmentation
def test_prosmin_paperaug_micro_changes_only_the_augmentation():
    base, paper = get_recipe("prosmin_micro").config, get_recipe("prosmin_paperaug_micro").config
    assert dataclasses.replace(paper, recipe=base.recipe, crops=base.crops) == base
    c = paper.crops
    assert c.global_scale == (0.8, 1.0)  # paper text: 0.8-1.0 of the area
    assert (c.brightness, c.contrast, c.saturation) == (0.8, 0.8, 0.8) and c.jitter_p == 0.8
    assert c.blur_p == (0.5, 0.5, 0.5)
    assert c.flip_p == c.solarize_p == c.grayscale_p == c.rotation_deg == c.noise_std == 0.0
    spec = get_model_spec("prosmin_paperaug_micro")
    assert spec.weights.recipe == "prosmin_paperaug_micro" and spec.method == "prosmin" and spec.scale == "mini"
