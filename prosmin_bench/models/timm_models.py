"""``timm:<name>[.<tag>]`` and ``timm:hf-hub:<org>/<repo>``: any timm model, with timm's own ``pretrained_cfg``
(weights and eval preprocessing).

- Preprocessing: ``timm.data.resolve_data_config(pretrained_cfg=...)`` as ``timm.data.create_transform`` builds it
  for eval (timm ``data/transforms_factory.py`` ``transforms_imagenet_eval``: Resize(floor(size / crop_pct)) +
  CenterCrop(size) + ToTensor + Normalize(mean, std)), as a :class:`Preprocess` (so tasks that change the
  preprocessing, ImageNet-C's no-resize view, still can); a config that is not a centre crop of a square input
  keeps timm's own transform (:class:`CustomPreprocess`).
- Weights: ``--weights FILE`` (any supported checkpoint format, or a ``.safetensors`` state dict; strict load),
  else for a tagged name the file of its ``pretrained_cfg`` in the Hugging Face cache (``hf_hub_id``) or torch
  hub's cache (``url``), downloaded there first unless downloads are off; offline without it, an error says which
  file to put where. An untagged ``timm:<name>`` without ``--weights`` is timm's random init, as before.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch.nn as nn

from ..errors import WeightsError, one_line
from .custom import CustomPreprocess
from .spec import ModelSpec, Preprocess
from .weights import _offline_reason, load_state_strict, load_weights, sha256_file

#: ``timm:hf-hub:<org>/<name>``: a model whose config.json and weights live in a Hugging Face repo (timm's own
#: ``hf-hub:`` names, ``timm/models/_hub.py`` ``load_model_config_from_hf``).
HF_HUB_PREFIX = "hf-hub:"

#: Files timm's Hugging Face repos hold a model's weights in, in the order timm tries them (``_hub.py``).
HF_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained config of ``<name>[.<tag>]`` (the default tag's for a bare name); {} when it has none."""
    from timm.models import get_pretrained_cfg

    if arch.startswith(HF_HUB_PREFIX):
        from timm.models import load_model_config_from_hf

        try:
            cfg_hf, _, _ = load_model_config_from_hf(arch[len(HF_HUB_PREFIX):])
        except Exception as exc:  # offline without the file, no such repo
            raise WeightsError(
                f"timm model {arch!r}: its config.json cannot be read ({one_line(exc)}); run once online, or put the "
                "repo's config.json and weights in the Hugging Face cache"
            ) from None
        return dict(cfg_hf)
    cfg = get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def data_config(arch: str) -> dict[str, Any]:
    """``timm.data.resolve_data_config`` for ``arch``'s pretrained config (input_size, interpolation, mean, std,
    crop_pct, crop_mode)."""
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=pretrained_cfg(arch))


def timm_preprocess(arch: str) -> Preprocess:
    """The eval preprocessing ``timm.data.create_transform(**data_config(arch))`` applies, as a Preprocess."""
    cfg = data_config(arch)
    _, h, w = cfg["input_size"]
    if cfg.get("crop_mode", "center") == "center" and h == w:
        return Preprocess(resize=math.floor(h / cfg["crop_pct"]), crop=int(h), interpolation=str(cfg["interpolation"]),
                          mean=tuple(map(float, cfg["mean"])), std=tuple(map(float, cfg["std"])))
    from timm.data import create_transform

    transform = create_transform(**cfg)
    return CustomPreprocess(resize=None, crop=int(h), transform=transform, description=f"timm {cfg}")


def is_tagged(arch: str) -> bool:
    """Whether ``arch`` names pretrained weights: ``<name>.<tag>`` or ``hf-hub:<org>/<name>``."""
    return "." in arch or arch.startswith(HF_HUB_PREFIX)


def cached_file(arch: str) -> tuple[Path | None, list[str]]:
    """The weights file of ``arch``'s pretrained config already on this machine, and the places looked at."""
    cfg = pretrained_cfg(arch)
    looked: list[str] = []
    repo = cfg.get("hf_hub_id")
    if repo:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(HF_FILES)
        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit), looked
        looked.append(f"{names[0]} of Hugging Face repo {repo} in {HF_HUB_CACHE}")
    url = cfg.get("url")
    if url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path, looked
        looked.append(str(path))
    return None, looked


def find_weights(spec: ModelSpec) -> Path:
    """The file of a tagged timm model's weights (downloaded into the cache first when downloads are on)."""
    arch = spec.arch.split(":", 1)[1]
    path, looked = cached_file(arch)
    if path is not None:
        return path
    offline = _offline_reason()
    if not looked:
        raise WeightsError(f"timm has no pretrained weights for {arch!r}; pass --weights FILE (a state dict of it)")
    if offline is None:
        try:
            import timm

            timm.create_model(arch, pretrained=True)  # timm downloads into the caches looked at above
        except Exception as exc:  # network, missing file: say what to do below
            offline = one_line(exc)
        path, looked = cached_file(arch)
        if path is not None:
            return path
    raise WeightsError(
        f"No weights for {spec.name!r} on this machine ({offline}): pass --weights FILE (a state dict of {arch}), "
        f"or put its file at {' or '.join(looked)} (e.g. `python -c \"import timm; timm.create_model('{arch}', "
        "pretrained=True)\"` on a machine online, then copy the cache)"
    )


def load_timm_weights(net: nn.Module, spec: ModelSpec, path: Path, *, verify_sha: bool) -> tuple[str, str, Any]:
    """Load ``path`` into ``net`` strictly (``load_weights``; a ``.safetensors`` file as a plain state dict)."""
    if path.suffix != ".safetensors":
        return load_weights(net, spec, path, verify_sha=verify_sha)
    from safetensors.torch import load_file

    from .converters import convert

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise WeightsError(f"Weights file {str(path)!r} is not a readable safetensors file ({one_line(exc)})") from None
    converted, fmt = convert(state, "plain")
    load_state_strict(net, converted, source=f"{str(path)!r} (format {fmt})")
    return sha256_file(path), fmt, state
