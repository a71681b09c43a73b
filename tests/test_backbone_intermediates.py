"""``cls_lastN`` through timm's public ``forward_intermediates`` (issue 22) equals DINO's ``n_last_blocks`` features
computed by hand: patch embedding, [CLS] token, position table, blocks, the final norm on each of the last n block
outputs, the [CLS] row of each (facebookresearch/dino eval_linear.py lines 166-167, vision_transformer.py lines
225-233), at the native size and, for a ViT with DINO's position rule, at another input size.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.models import get_model
from prosmin_bench.models.architectures import build_architecture, use_dino_pos_interpolation
from prosmin_bench.models.backbone import Backbone


def random_vit(**kwargs) -> torch.nn.Module:
    """vit_micro (32 px, patch 4, width 96, depth 4) with every parameter drawn N(0, 0.2^2): no near-zero [CLS]
    token or position table and no identity norms, so a missed step shows in the output."""
    net = build_architecture("vit_micro", drop_path_rate=0.0, **kwargs)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return net.eval()


def backbone(net: torch.nn.Module) -> Backbone:
    return Backbone(get_model("random_micro").spec, net, "0" * 64)


def dino_pos_table(pos_embed: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding`` (vision_transformer.py lines 174-194), written out again here."""
    n = pos_embed.shape[1] - 1
    if n == (h // patch) * (w // patch) and h == w:
        return pos_embed
    dim, side = pos_embed.shape[-1], int(math.sqrt(n))
    w0, h0 = h // patch + 0.1, w // patch + 0.1  # DINO reads the shape as (B, nc, w, h): rows first
    grid = F.interpolate(pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                         scale_factor=(w0 / side, h0 / side), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def by_hand(net: torch.nn.Module, x: torch.Tensor, n: int) -> torch.Tensor:
    """[N, n * D]: the final-norm [CLS] rows of the last ``n`` blocks, concatenated, with DINO's position table."""
    b, _, h, w = x.shape
    conv = net.patch_embed.proj
    patches = conv(x).flatten(2).transpose(1, 2)  # [N, P, D], row-major patches
    tokens = torch.cat([net.cls_token.expand(b, -1, -1), patches], dim=1)
    tokens = tokens + dino_pos_table(net.pos_embed, h, w, conv.kernel_size[0])
    outs = []
    for i, blk in enumerate(net.blocks):
        tokens = blk(tokens)
        if len(net.blocks) - i <= n:
            outs.append(net.norm(tokens)[:, 0])
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("n", [1, 2, 4])
@torch.no_grad()
def test_last_blocks_cls_equals_the_blocks_run_by_hand(n):
    net = random_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = backbone(net).features(x, f"cls_last{n}")
    assert got.shape == (3, 96 * n)
    torch.testing.assert_close(got, by_hand(net, x, n))
    torch.testing.assert_close(got[:, -96:], backbone(net).features(x, "cls"))  # the last chunk is forward's CLS


@pytest.mark.parametrize("n", [1, 4])
@torch.no_grad()
def test_dino_position_rule_applies_at_another_input_size(n):
    """forward_intermediates calls the model's own ``_pos_embed``, so ``DinoPosEmbedViT``'s override is used: 24 px
    (a 6 x 6 grid from the 8 x 8 table) matches DINO's rule by hand and differs from timm's own resampling."""
    plain = random_vit(dynamic_img_size=True)
    dino = random_vit(dynamic_img_size=True)
    use_dino_pos_interpolation(dino)
    x = torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    got = backbone(dino).features(x, f"cls_last{n}")
    assert got.shape == (2, 96 * n)
    torch.testing.assert_close(got, by_hand(dino, x, n))
    timm_rule = backbone(plain).features(x, f"cls_last{n}")
    assert (got - timm_rule).abs().max().item() > 5e-4  # timm's own (antialiased) resampling: 2e-3 apart here
    x32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))  # native: the table as it is
    torch.testing.assert_close(backbone(dino).features(x32, f"cls_last{n}"), by_hand(plain, x32, n))


def test_more_blocks_than_depth_or_no_cls_token_is_refused():
    with pytest.raises(ProsminBenchError, match="Expected n_last_blocks <= depth 4, but got 5"):
        backbone(random_vit()).features(torch.zeros(1, 3, 32, 32), "cls_last5")
    with pytest.raises(ProsminBenchError, match=r"'cls_last2' needs a ViT with a \[CLS\] token"):
        backbone(random_vit(class_token=False, global_pool="avg")).features(torch.zeros(1, 3, 32, 32), "cls_last2")
