"""Pretraining recipes: named, typed, complete configs (one place; each value that differs from the config
defaults says where it comes from).

- ``prosmin_vits16_in1k``: ProSMin ViT-S/16 on ImageNet-1k with the paper's values (PROTOCOLS.md "ProSMin").
- ``prosmin_micro``: ProSMin on the bundled digits (32 px) with the micro ViT, tuned inside ProSMin's own knobs
  to learn in about two minutes on two CPU cores (the numbers it reaches are in the module docstring of
  ``methods/prosmin.py``'s recipe note below).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry
from .config import DataConfig, MultiCropConfig, OptimConfig, PretrainConfig, RunConfig
from .methods.prosmin import ProSMinConfig


@dataclass(frozen=True)
class Recipe:
    """A named pretraining config. ``scale``: "mini" (bundled data, CPU) or "imagenet" (GPUs, ``--data-root``)."""

    name: str
    config: PretrainConfig
    description: str
    scale: str = "imagenet"


RECIPES: Registry[Recipe] = Registry("recipe", "prosmin-bench list recipes")


def register_recipe(recipe: Recipe) -> Recipe:
    return RECIPES.add(recipe.name, recipe, origin=__name__)


def get_recipe(name: str) -> Recipe:
    return RECIPES.get(name)


#: Mini-scale normalisation: equal to the eval preprocessing of the *_micro models (models/spec.py MINI_PREPROCESS).
MINI_MEAN = (0.5, 0.5, 0.5)
MINI_STD = (0.5, 0.5, 0.5)

register_recipe(Recipe(
    name="prosmin_vits16_in1k",
    scale="imagenet",
    description="ProSMin ViT-S/16, ImageNet-1k, 800 epochs, batch 512 (paper Table 1 setting)",
    config=PretrainConfig(
        recipe="prosmin_vits16_in1k",
        method="prosmin",
        arch="vit_small_patch16",
        arch_kwargs={"drop_path_rate": 0.1, "dynamic_img_size": True},  # drop path: paper; dynamic size: 96-px local crops (DINO interpolates pos. embeddings)
        method_config=ProSMinConfig(
            out_dim=12000,  # released code --out_dim
            predictor_hidden_dim=12000,  # paper: predictor hidden width 12000
            loss_scale=22.0,  # released scoreloss.py: 10 * (2 E|z-y| + 2.4 * (-E|z-z'|/2)) = 22 x energy_score
        ),
        data=DataConfig(dataset="imagenet", num_workers=10),  # released code --num_workers 10
        crops=MultiCropConfig(backend="pil"),  # DINO/ProSMin: 2 x 224 (0.4-1) + 16 x 96 (0.05-0.4)
        optim=OptimConfig(epochs=800, batch_size=512, lr=0.0005, warmup_epochs=30, weight_decay=0.04,
                          weight_decay_end=0.4, clip_grad=3.0),  # paper values (PROTOCOLS.md "Optimisation")
        run=RunConfig(checkpoint_every_steps=2500),  # ~1 epoch at batch 512 (1,281,167 images)
    ),
))

register_recipe(Recipe(
    name="prosmin_micro",
    scale="mini",
    description="ProSMin micro ViT on the bundled digits (32 px); about two minutes on two CPU cores",
    config=PretrainConfig(
        recipe="prosmin_micro",
        method="prosmin",
        arch="vit_micro",
        arch_kwargs={"drop_path_rate": 0.0, "dynamic_img_size": True},  # dynamic size: 16-px local crops
        method_config=ProSMinConfig(
            momentum_start=0.99,
            drop_path_rate=0.0,
            out_dim=256,
            head_hidden_dim=512,
            head_bottleneck_dim=64,
            predictor_hidden_dim=512,
        ),
        data=DataConfig(dataset="digits", num_workers=0, mean=MINI_MEAN, std=MINI_STD),
        crops=MultiCropConfig(
            backend="tensor", global_crops=2, global_size=32, global_scale=(0.6, 1.0), local_crops=4, local_size=16,
            local_scale=(0.2, 0.6), flip_p=0.0, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0,
            grayscale_p=0.0, blur_p=(0.5, 0.1, 0.2), blur_sigma=(0.1, 1.0), solarize_p=0.0, rotation_deg=10.0,
            shear_deg=5.0, noise_std=0.05,
        ),
        optim=OptimConfig(epochs=30, batch_size=128, lr=0.001, min_lr=1e-5, warmup_epochs=3, weight_decay=0.04,
                          weight_decay_end=0.1, clip_grad=3.0),
        run=RunConfig(checkpoint_every_steps=100, precision="fp32"),
    ),
))
