"""Backbone architectures by name (no weights here: weights have their own names, see ``models/zoo.py``).

``vit_micro`` is the suite's 32-px ViT for the mini scale (~0.46M parameters: dim 96, depth 4, 3 heads, patch 4;
docs/protocols.md "Measured here on the mini data"). ``vit_small_patch16`` is timm's ViT-S/16 as used by DINO, iBOT,
MoCo-v3 and ProSMin. Any timm model is reachable as ``timm:<name>``. ``pixels`` and ``pixels_randproj`` are the
non-learned references of the mini leaderboard (:class:`PixelFeatures`): no parameter, nothing to train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ProsminBenchError
from ..registry import Registry

ARCHITECTURES: Registry[Callable[..., nn.Module]] = Registry("architecture", "prosmin-bench list models")


def _timm_vit(name: str, **kwargs: Any) -> nn.Module:
    import timm  # here and below, not at the top: a second to import, and listing models never builds one

    kwargs.setdefault("num_classes", 0)  # backbone only: features, no classifier
    return timm.create_model(name, pretrained=False, **kwargs)


@ARCHITECTURES.register("vit_micro")
def vit_micro(**kwargs: Any) -> nn.Module:
    """ViT for 32x32 inputs: 8x8 = 64 patches of 4 px, width 96, 4 blocks, 3 heads (~0.46M parameters)."""
    from timm.models.vision_transformer import VisionTransformer

    cfg: dict[str, Any] = dict(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, num_classes=0
    )
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


@ARCHITECTURES.register("vit_small_patch16")
def vit_small_patch16(**kwargs: Any) -> nn.Module:
    """ViT-S/16 at 224 px (dim 384, depth 12, 6 heads unless ``num_heads`` says otherwise: MoCo-v3 uses 12)."""
    return _timm_vit("vit_small_patch16_224", **kwargs)


@ARCHITECTURES.register("vit_base_patch16")
def vit_base_patch16(**kwargs: Any) -> nn.Module:
    """ViT-B/16 at 224 px."""
    return _timm_vit("vit_base_patch16_224", **kwargs)


class PixelFeatures(nn.Module):
    """A non-learned reference "backbone": images [N, C, H, W] (after the model's eval preprocessing) -> the
    flattened pixels [N, C * H * W], or with ``proj_dim`` > 0 a fixed Gaussian random projection of them
    [N, proj_dim]: ``x @ P / sqrt(proj_dim)`` with ``P[i, j] ~ N(0, 1)`` drawn by ``torch.randn`` from
    ``torch.Generator().manual_seed(seed)`` (float32, shape [C * H * W, proj_dim]). The 1 / sqrt(proj_dim) scale
    keeps squared norms in expectation, E ||x P||^2 / proj_dim = ||x||^2 (Johnson-Lindenstrauss; Dasgupta &
    Gupta 2003), so distances and cosines are preserved approximately.

    Every feature layer a task asks for ("cls", "avgpool", "cls_lastN") is this one vector (``Backbone`` reads
    ``same_features_every_layer``): a reference has no blocks, and repeating the vector N times for "cls_lastN"
    would change nothing a linear probe can learn. ``P`` is a buffer, never a parameter: fine-tuning trains only
    the task's head. The state dict (``input_shape`` and ``P``) is what ``weights_sha256`` hashes.
    """

    #: ``Backbone.features`` serves this module's output for every layer name (see above).
    same_features_every_layer = True

    def __init__(self, img_size: int = 32, in_chans: int = 3, proj_dim: int = 0, seed: int = 0) -> None:
        super().__init__()
        d_in = in_chans * img_size * img_size
        self.register_buffer("input_shape", torch.tensor([in_chans, img_size, img_size], dtype=torch.int64))
        projection = None
        if proj_dim:
            gen = torch.Generator().manual_seed(seed)
            projection = torch.randn(d_in, proj_dim, generator=gen, dtype=torch.float32) / math.sqrt(proj_dim)
        self.register_buffer("projection", projection)
        self.num_features = int(proj_dim or d_in)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> features [N, C * H * W] (pixels) or [N, proj_dim] (random projection)."""
        want = tuple(int(v) for v in self.input_shape.tolist())
        if tuple(images.shape[1:]) != want:
            raise ProsminBenchError(
                f"Expected images of shape [N, {want[0]}, {want[1]}, {want[2]}] for a pixel reference model, but got "
                f"{list(images.shape)}; use the model's own preprocessing (32-px mini-scale images)"
            )
        x = images.flatten(1)
        return x if self.projection is None else x @ self.projection.to(x.dtype)


@ARCHITECTURES.register("pixels")
def pixels(**kwargs: Any) -> nn.Module:
    """The raw normalised pixels, flattened: 3 x 32 x 32 = 3,072 features for the mini scale."""
    return PixelFeatures(**{"img_size": 32, "in_chans": 3, **kwargs, "proj_dim": 0})


#: Width of ``pixels_randproj``: the width of the linear probe's input for every micro ViT (``cls_last4`` =
#: 4 x 96) and of ViT-S/16's CLS token, so the reference is compared at the width the learned models have.
RANDPROJ_DIM = 384
#: Seed of ``pixels_randproj``'s projection matrix (one fixed model, like ``random_micro``'s init seed 0).
RANDPROJ_SEED = 0


@ARCHITECTURES.register("pixels_randproj")
def pixels_randproj(**kwargs: Any) -> nn.Module:
    """A fixed Gaussian random projection of the normalised pixels to ``RANDPROJ_DIM`` = 384 dimensions."""
    return PixelFeatures(**{"img_size": 32, "in_chans": 3, "proj_dim": RANDPROJ_DIM, "seed": RANDPROJ_SEED, **kwargs})


def sincos_2d_position_embedding(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo-v3's fixed position embedding [1, 1 + H * W, dim] (``vits.py`` ``build_2d_sincos_position_embedding``):
    a zero row for [CLS], then for the patch in row ``i``, column ``j`` (timm's row-major token order)
    ``[sin(i * omega), cos(i * omega), sin(j * omega), cos(j * omega)]`` with ``omega_d = temperature^(-d / (dim/4))``.
    (``vits.py`` builds ``meshgrid(w, h)`` with 'ij' indexing and flattens it, so its first coordinate is the
    slower-varying one, the row.)"""
    if dim % 4:
        raise ValueError(f"A 2-D sin-cos position embedding needs a width divisible by 4, but got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    a = rows.flatten()[:, None] * omega[None]
    c = cols.flatten()[:, None] * omega[None]
    emb = torch.cat([a.sin(), a.cos(), c.sin(), c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def set_sincos_position_embedding(vit: nn.Module) -> None:
    """Overwrite a timm ViT's position embedding with :func:`sincos_2d_position_embedding` and freeze it (MoCo-v3's
    fixed positions). Raises ValueError for a model without one [CLS] token and a ``pos_embed``."""
    if getattr(vit, "num_prefix_tokens", 1) != 1 or getattr(vit, "pos_embed", None) is None:
        raise ValueError("a fixed sin-cos position embedding needs a ViT with one [CLS] token and a pos_embed")
    grid = tuple(int(g) for g in vit.patch_embed.grid_size)
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_2d_position_embedding(grid, vit.pos_embed.shape[-1]))
    vit.pos_embed.requires_grad_(False)


def mocov3_init_(vit: nn.Module) -> None:
    """MoCo-v3's ViT weight initialisation, in place, as ``VisionTransformerMoCo.__init__`` (facebookresearch/moco-v3
    ``vits.py`` lines 31-47), drawn from the current torch RNG in its order:

    - every ``nn.Linear`` (qkv, attention projection, MLP; the backbone has no classifier): xavier-uniform, with
      qkv's weight [3D, D] treated as three separate [D, D] blocks, i.e. uniform(+-sqrt(6 / (3D/3 + D)))
      (lines 34-37), and zero biases (line 40);
    - the [CLS] token: normal(std 1e-6) (line 41);
    - the patch projection conv [D, C, p, p], seen as a linear map of the flattened patch: uniform(+-sqrt(6 /
      (C p p + D))) with zero bias (lines 43-47; ``vits.py`` writes 3 for the C = 3 input channels).

    LayerNorms keep their ones / zeros (timm's and vits.py's), and the position embedding is left alone (MoCo-v3
    builds its fixed sin-cos table first, line 29: :func:`set_sincos_position_embedding`). Freezing the patch
    projection (``--stop-grad-conv1``, lines 49-51) is the caller's, after this init. Raises ValueError for a
    model without a ``patch_embed.proj`` convolution."""
    proj = getattr(getattr(vit, "patch_embed", None), "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise ValueError("MoCo-v3's initialisation needs a ViT whose patch_embed.proj is a Conv2d")
    with torch.no_grad():
        for name, m in vit.named_modules():
            if isinstance(m, nn.Linear):
                if "qkv" in name:
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if getattr(vit, "cls_token", None) is not None:
            nn.init.normal_(vit.cls_token, std=1e-6)
        dim, chans, kh, kw = proj.weight.shape
        bound = math.sqrt(6.0 / float(chans * kh * kw + dim))
        nn.init.uniform_(proj.weight, -bound, bound)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)


#: How a ViT with ``dynamic_img_size`` resamples its position embedding for another input size: "timm" (timm's
#: ``resample_abs_pos_embed``: bicubic to the target grid, antialiased) or "dino" (DINO's ``interpolate_pos_encoding``,
#: :func:`dino_interpolate_pos_encoding`).
POS_INTERPOLATIONS = ("timm", "dino")


def dino_resample_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """:func:`dino_interpolate_pos_encoding` for a target grid of ``rows`` x ``cols`` patches."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"DINO's position interpolation needs a square grid, but the embedding has {n} patches")
    if rows * cols == n and rows == cols:  # vision_transformer.py line 177: the native size is returned as is
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # line 186: "+ 0.1 to avoid floating point error"; the scale factor (not the output size) goes to interpolate,
    # so the sampling positions are those of a (rows + 0.1) / side scaling; bicubic, no antialias (lines 187-191)
    out = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
    if tuple(out.shape[-2:]) != (rows, cols):  # line 192's assertion
        raise ValueError(f"DINO's position interpolation gave a {tuple(out.shape[-2:])} grid for {(rows, cols)}")
    return torch.cat([pos_embed[:, :1], out.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)], dim=1)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """DINO's ``VisionTransformer.interpolate_pos_encoding`` (facebookresearch/dino ``vision_transformer.py``
    lines 174-194; iBOT's and ProSMin's released ``vision_transformer.py`` carry the same function): the [CLS]
    row [1, 1 + N, D] kept, the sqrt(N) x sqrt(N) patch table resampled bicubically with scale factors
    ((h / patch + 0.1) / sqrt(N), (w / patch + 0.1) / sqrt(N)) for an image of ``h`` x ``w`` pixels (DINO's
    ``x.shape`` is read as ``B, nc, w, h``, so its first factor is the rows': the same rule). Returns
    [1, 1 + (h // patch) * (w // patch), D]."""
    return dino_resample_pos_embed(pos_embed, h // patch, w // patch)


_DINO_POS_VIT: type | None = None


def _dino_pos_vit_class() -> type:
    """The class :func:`use_dino_pos_interpolation` gives a ViT, made on first use (importing timm takes a second)
    and reachable as ``architectures.DinoPosEmbedViT``, so a model using it pickles like any other."""
    global _DINO_POS_VIT
    if _DINO_POS_VIT is not None:
        return _DINO_POS_VIT
    from timm.models.vision_transformer import VisionTransformer

    class DinoPosEmbedViT(VisionTransformer):
        """timm's ViT whose dynamic-size position embedding follows DINO's rule (:func:`dino_resample_pos_embed`)
        instead of timm's antialiased resampling; everything else, the state dict included, is timm's."""

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
            if not self.dynamic_img_size:  # fixed size: timm adds the table as it is, as DINO does at its size
                return super()._pos_embed(x)
            b, rows, cols, c = x.shape  # timm's patch_embed output with dynamic_img_size (NHWC)
            pos = dino_resample_pos_embed(self.pos_embed, rows, cols)
            x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, c)], dim=1)
            return self.pos_drop(x + pos)

    DinoPosEmbedViT.__module__, DinoPosEmbedViT.__qualname__ = __name__, "DinoPosEmbedViT"
    _DINO_POS_VIT = DinoPosEmbedViT
    return DinoPosEmbedViT


def __getattr__(name: str) -> Any:
    if name == "DinoPosEmbedViT":
        return _dino_pos_vit_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_dino_pos_interpolation(vit: nn.Module) -> None:
    """Make a timm ``VisionTransformer`` (one [CLS] token, no register tokens, a class-token position row,
    ``dynamic_img_size``) resample its position embedding for other input sizes with DINO's rule
    (:func:`dino_interpolate_pos_encoding`), in place. Only the forward changes (its class becomes a subclass
    overriding ``_pos_embed``), so checkpoints stay timm's; at the native size both rules add the table as it is.
    Raises ValueError for any other model."""
    from timm.models.vision_transformer import VisionTransformer

    cls = _dino_pos_vit_class()
    if type(vit) is cls:
        return
    if type(vit) is not VisionTransformer:
        raise ValueError(f"DINO's position interpolation needs timm's VisionTransformer, but got {type(vit).__name__}")
    if not vit.dynamic_img_size:
        raise ValueError("DINO's position interpolation applies to inputs of other sizes: build the ViT with "
                         "dynamic_img_size=True (arch_kwargs)")
    if (vit.pos_embed is None or vit.cls_token is None or getattr(vit, "reg_token", None) is not None
            or vit.no_embed_class or vit.num_prefix_tokens != 1):
        raise ValueError("DINO's position interpolation needs a ViT with one [CLS] token that has its own position "
                         "row and no register tokens")
    vit.__class__ = cls


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised backbone; ``timm:<name>`` builds any timm model without a classifier."""
    if name.startswith("timm:"):
        return _timm_vit(name[len("timm:") :], **kwargs)
    return ARCHITECTURES.get(name)(**kwargs)
