"""Multi-crop augmentation: global and local views (DINO, Caron et al. 2021; ProSMin uses the same recipe).

Two backends with one config (:class:`~prosmin_bench.pretrain.config.MultiCropConfig`):

- :class:`PILMultiCrop`: DINO's per-image pipeline for ImageNet-scale data, run in DataLoader workers.
  Global view 1: RandomResizedCrop (bicubic), flip, colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur
  (p=1.0); global view 2: the same with blur p=0.1 and solarize p=0.2; local views: smaller crops, blur p=0.5.
- :class:`TensorMultiCrop`: the same kinds of operations applied to a whole batch at once on the compute device
  (random resized crop, optional rotation and shear as one affine warp through ``affine_grid``/``grid_sample``,
  brightness/contrast/saturation jitter, grayscale, Gaussian blur, solarize, Gaussian noise). For small images
  (the 32-px mini scale) it is several times faster than per-image PIL (docs/protocols.md "Measured here on the mini
  data"). Every random number about an image comes from that image's generator (``pretrain/rng.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import ImageFilter, ImageOps
from torchvision import transforms as T

from .config import ConfigError, MultiCropConfig
from .rng import SampleRNG

# Rec. 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


# ------------------------------------------------------------------------------------------------ PIL backend
class _RandomGaussianBlur:
    """DINO's GaussianBlur: with probability p, PIL GaussianBlur of radius U(lo, hi)."""

    def __init__(self, p: float, sigma: tuple[float, float]) -> None:
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if float(torch.rand(())) >= self.p:
            return img
        lo, hi = self.sigma
        return img.filter(ImageFilter.GaussianBlur(radius=lo + float(torch.rand(())) * (hi - lo)))


class _RandomSolarize:
    """DINO's Solarization: with probability p, PIL ImageOps.solarize (threshold 128)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if float(torch.rand(())) < self.p else img


class PILMultiCrop:
    """DINO's ``DataAugmentationDINO``: PIL image -> list of ``global_crops + local_crops`` tensors [3, S, S]."""

    def __init__(self, crops: MultiCropConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        bicubic = T.InterpolationMode.BICUBIC
        flip_jitter = T.Compose([
            T.RandomHorizontalFlip(p=crops.flip_p),
            T.RandomApply([T.ColorJitter(crops.brightness, crops.contrast, crops.saturation, crops.hue)],
                          p=crops.jitter_p),
            T.RandomGrayscale(p=crops.grayscale_p),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
        g_crop = T.RandomResizedCrop(crops.global_size, scale=crops.global_scale, ratio=crops.ratio,
                                     interpolation=bicubic)
        self.global1 = T.Compose([g_crop, flip_jitter, _RandomGaussianBlur(crops.blur_p[0], crops.blur_sigma),
                                  normalize])
        self.global2 = T.Compose([g_crop, flip_jitter, _RandomGaussianBlur(crops.blur_p[1], crops.blur_sigma),
                                  _RandomSolarize(crops.solarize_p), normalize])
        self.local = T.Compose([
            T.RandomResizedCrop(crops.local_size, scale=crops.local_scale, ratio=crops.ratio, interpolation=bicubic),
            flip_jitter, _RandomGaussianBlur(crops.blur_p[2], crops.blur_sigma), normalize,
        ])
        self.n_global, self.n_local = crops.global_crops, crops.local_crops

    def __call__(self, img) -> list[torch.Tensor]:
        views = [(self.global1 if i % 2 == 0 else self.global2)(img) for i in range(self.n_global)]
        views += [self.local(img) for _ in range(self.n_local)]
        return views


# --------------------------------------------------------------------------------------------- tensor backend
# Columns of the per-(image, view) uniform draws.
_SCALE, _RATIO, _CX, _CY, _FLIP, _ROT, _SHEAR, _JIT, _BRI, _CON, _SAT, _GRAY, _BLUR, _BSIG, _SOL = range(15)
_N_UNIFORM = 15


class TensorMultiCrop:
    """Batched multi-crop on tensors.

    ``__call__(images [b, 3, H, W] in [0, 1], rng) -> (global_views, local_views)``: lists of normalised
    views [b, 3, S, S]. View ``v`` of image ``n`` depends only on ``rng``'s generator for image ``n``.
    """

    def __init__(self, crops: MultiCropConfig, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if crops.hue:
            raise ConfigError("crops.hue must be 0 with crops.backend='tensor' (hue jitter is PIL-only)")
        self.c = crops
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, rng: SampleRNG) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        c, b, dev = self.c, images.shape[0], images.device
        n_views = c.n_views
        u = rng.rand((n_views, _N_UNIFORM), stream="augment").to(dev)  # [b, V, 15]
        out_g = self._views(images, u[:, : c.global_crops], c.global_size, c.global_scale, rng, "global", True)
        out_l = []
        if c.local_crops:
            out_l = self._views(images, u[:, c.global_crops :], c.local_size, c.local_scale, rng, "local", False)
        return out_g, out_l

    def _views(self, images: torch.Tensor, u: torch.Tensor, size: int, scale: tuple[float, float], rng: SampleRNG,
               stream: str, is_global: bool) -> list[torch.Tensor]:
        c = self.c
        b, n = images.shape[0], u.shape[1]
        u = u.transpose(0, 1).reshape(n * b, _N_UNIFORM)  # rows view-major: row = v * b + i
        x = images.repeat(n, 1, 1, 1)
        x = self._warp(x, u, size, scale)
        x = self._photometric(x, u)
        # blur probability per view: DINO uses 1.0 / 0.1 for the two global views, 0.5 for local views
        if is_global:
            p_blur = torch.tensor([c.blur_p[0] if v % 2 == 0 else c.blur_p[1] for v in range(n)], device=x.device)
            p_sol = torch.tensor([0.0 if v % 2 == 0 else c.solarize_p for v in range(n)], device=x.device)
        else:
            p_blur = torch.full((n,), c.blur_p[2], device=x.device)
            p_sol = torch.zeros(n, device=x.device)
        p_blur, p_sol = p_blur.repeat_interleave(b), p_sol.repeat_interleave(b)
        x = self._blur(x, u, p_blur)
        sol = (u[:, _SOL] < p_sol).view(-1, 1, 1, 1)
        x = torch.where(sol & (x >= 0.5), 1.0 - x, x)  # PIL solarize: invert pixels at or above 128
        if c.noise_std > 0:
            noise = rng.randn((n, 3, size, size), stream=f"noise_{stream}").to(x.device)  # [b, n, 3, S, S]
            x = (x + c.noise_std * noise.transpose(0, 1).reshape_as(x)).clamp(0.0, 1.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return list(x.reshape(n, b, 3, size, size).unbind(0))

    def _warp(self, x: torch.Tensor, u: torch.Tensor, size: int, scale: tuple[float, float]) -> torch.Tensor:
        """RandomResizedCrop (area fraction in ``scale``, log-uniform aspect ratio), flip, rotation and shear as
        one affine map from output to input coordinates ([-1, 1] normalised, ``align_corners=False``)."""
        c = self.c
        area = scale[0] + u[:, _SCALE] * (scale[1] - scale[0])
        log_r = math.log(c.ratio[0]) + u[:, _RATIO] * (math.log(c.ratio[1]) - math.log(c.ratio[0]))
        ratio = torch.exp(log_r)
        # torchvision retries draws whose box leaves the image; clamping the sides to the image is the
        # batched equivalent (it only changes the rare extreme-ratio draws at large scales)
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (u[:, _CX] * (1.0 - w) + w / 2.0) * 2.0 - 1.0
        cy = (u[:, _CY] * (1.0 - h) + h / 2.0) * 2.0 - 1.0
        flip = torch.where(u[:, _FLIP] < c.flip_p, -1.0, 1.0)
        rot = (2.0 * u[:, _ROT] - 1.0) * math.radians(c.rotation_deg)
        shear = torch.tan((2.0 * u[:, _SHEAR] - 1.0) * math.radians(c.shear_deg))
        cos, sin = torch.cos(rot), torch.sin(rot)
        sx, sy = w * flip, h
        # A = R(rot) @ [[1, shear], [0, 1]] @ diag(sx, sy)
        a11, a12 = cos * sx, (cos * shear - sin) * sy
        a21, a22 = sin * sx, (sin * shear + cos) * sy
        theta = torch.stack([torch.stack([a11, a12, cx], -1), torch.stack([a21, a22, cy], -1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), [x.shape[0], 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _photometric(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Colour jitter (brightness, contrast, saturation; applied with ``jitter_p``) then grayscale."""
        c = self.c
        luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        jit = (u[:, _JIT] < c.jitter_p).view(-1, 1, 1, 1)
        fb = (1.0 + (2.0 * u[:, _BRI] - 1.0) * c.brightness).view(-1, 1, 1, 1)
        fc = (1.0 + (2.0 * u[:, _CON] - 1.0) * c.contrast).view(-1, 1, 1, 1)
        fs = (1.0 + (2.0 * u[:, _SAT] - 1.0) * c.saturation).view(-1, 1, 1, 1)
        y = (x * fb).clamp(0.0, 1.0)
        gray_mean = (y * luma).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        y = ((y - gray_mean) * fc + gray_mean).clamp(0.0, 1.0)
        gray = (y * luma).sum(1, keepdim=True)
        y = ((y - gray) * fs + gray).clamp(0.0, 1.0)
        x = torch.where(jit, y, x)
        to_gray = (u[:, _GRAY] < c.grayscale_p).view(-1, 1, 1, 1)
        return torch.where(to_gray, (x * luma).sum(1, keepdim=True).expand_as(x), x)

    def _blur(self, x: torch.Tensor, u: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with a per-image sigma ~ U(blur_sigma), applied with probability ``p``."""
        lo, hi = self.c.blur_sigma
        apply = u[:, _BLUR] < p
        if not bool(apply.any()):
            return x
        rows, ch, H, W = x.shape
        radius = max(1, min(int(math.ceil(3.0 * hi)), (min(H, W) - 1) // 2))
        sigma = (lo + u[:, _BSIG] * (hi - lo)).clamp(min=1e-3)
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2.0 * sigma[:, None] ** 2))
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [rows * 3, K]
        y = x.reshape(1, rows * ch, H, W)
        y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=rows * ch)
        y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=rows * ch)
        return torch.where(apply.view(-1, 1, 1, 1), y.reshape(rows, ch, H, W), x)


def build_augmentation(crops: MultiCropConfig, mean: tuple[float, ...], std: tuple[float, ...]):
    """The augmentation object for ``crops.backend`` (``"pil"`` or ``"tensor"``)."""
    if crops.backend == "pil":
        return PILMultiCrop(crops, mean, std)
    if crops.backend == "tensor":
        return TensorMultiCrop(crops, mean, std)
    raise ConfigError(f"Expected crops.backend 'pil' or 'tensor', but got {crops.backend!r}")
