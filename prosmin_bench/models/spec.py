"""ModelSpec: declarative metadata for a named model (architecture + weights + preprocessing).

Listing models never touches a checkpoint: a spec is data. ``models/zoo.py`` registers the built-in specs and
turns ``baselines/*.toml`` cards into specs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

#: torchvision's ``InterpolationMode`` values (what ``Preprocess.build`` accepts), spelled out so that reading a
#: card does not import torchvision.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of PIL images.

    ImageNet scale follows DINO's eval (Resize 256 bicubic + CenterCrop 224 + ImageNet mean/std, docs/protocols.md
    k-NN). Mini scale feeds the 32-px images as they are.
    """

    resize: int | None = 256
    crop: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def build(self):
        """Return a torchvision transform: PIL image -> float tensor [3, crop, crop]."""
        from torchvision import transforms as T  # here, not at the top: slow to import; only evaluation needs it

        interp = T.InterpolationMode(self.interpolation)
        ops: list[Any] = []
        if self.resize is not None:
            ops.append(T.Resize(self.resize, interpolation=interp))
        ops += [T.CenterCrop(self.crop), T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(ops)

    def problem(self) -> tuple[str, str] | None:
        """The first field that cannot work and what is wrong with it, or None when every field is usable."""
        if self.resize is not None and (isinstance(self.resize, bool) or not isinstance(self.resize, int)
                                        or self.resize < 1):
            return "resize", f"must be a positive integer, but got {self.resize!r}"
        if isinstance(self.crop, bool) or not isinstance(self.crop, int) or self.crop < 1:
            return "crop", f"must be a positive integer, but got {self.crop!r}"
        if self.resize is not None and self.crop > self.resize:
            # Resize(n) makes the shorter side n: a larger centre crop pads the image with zeros
            return "crop", f"must not exceed resize ({self.resize}), but got {self.crop}"
        if self.interpolation not in INTERPOLATIONS:
            return "interpolation", f"must be one of {list(INTERPOLATIONS)}, but got {self.interpolation!r}"
        for name, values, positive in (("mean", self.mean, False), ("std", self.std, True)):
            ok = len(values) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
                for v in values
            )
            if not ok:
                what = "finite positive numbers" if positive else "finite numbers"
                return name, f"must be 3 {what} (one per RGB channel), but got {list(values)!r}"
        return None

    def key(self) -> str:
        """A stable description used in cache keys (a change of preprocessing changes the features)."""
        return f"resize={self.resize},crop={self.crop},interp={self.interpolation},mean={self.mean},std={self.std}"


#: Mini-scale preprocessing: the 32-px digits as they are; mean/std 0.5 maps [0, 1] to [-1, 1].
MINI_PREPROCESS = Preprocess(resize=None, crop=32, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights come from.

    Exactly one of: ``url`` (official file, optional pinned ``sha256``), ``recipe`` (the pretraining module's
    output for that recipe), or ``random`` (untrained: the floor every method must beat).
    """

    url: str | None = None
    filename: str | None = None
    sha256: str | None = None
    format: str | None = None  # expected checkpoint format (see models/converters.py FORMATS)
    recipe: str | None = None
    random: bool = False
    seed: int = 0  # init seed for random weights, so "random" is one fixed model
    # random weights only: "timm" (timm's default init), "sincos" (timm's init with MoCo-v3's fixed 2-D sin-cos
    # position embedding) or "mocov3" (MoCo-v3's vits.py init, models.architectures.mocov3_init_, with that sin-cos
    # embedding: the starting point of every *_micro recipe, see pretrain/recipes_baselines.py)
    init: str = "timm"
    # this suite's pretraining checkpoints only: "online" or "target", the network whose backbone is evaluated;
    # None: the method's own choice (models/converters.py ONLINE_EVALUATED: ProSMin's paper, Sec. 6, and MoCo-v3's
    # main_lincls.py evaluate the online network, DINO's and iBOT's eval scripts the teacher)
    network: str | None = None

    @property
    def kind(self) -> str:
        return "url" if self.url else "recipe" if self.recipe else "random" if self.random else "file"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: architecture and its kwargs, weights source, feature layer and eval preprocessing."""

    name: str
    arch: str
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: WeightsSource = field(default_factory=WeightsSource)
    converter: str = "auto"  # converter family; "auto" detects the format from the checkpoint's keys
    feature_layer: str = "cls"  # final-norm CLS token (DINO k-NN protocol)
    preprocess: Preprocess = field(default_factory=Preprocess)
    scale: str = "imagenet"  # "mini" or "imagenet": which suite the model belongs to
    method: str = ""  # dino | ibot | mocov3 | prosmin | supervised | random | ""
    pretrained_on: tuple[str, ...] = ()  # dataset names seen in pretraining (flagged on the leaderboard)
    paper: str = ""
    licence: str = ""
    description: str = ""
    reported: dict[str, Any] = field(default_factory=dict)  # numbers the model's papers report, with citation
    card: str = ""  # file the spec came from, if any
    #: a non-learned reference (raw pixels, a random projection of them): tabulated to place the numbers, never
    #: ranked or compared for significance
    reference: bool = False
    #: the model this one is a variant of (the same weights seen another way, e.g. ``prosmin_target_micro``: the
    #: ``prosmin_micro`` checkpoint through its target network): tabulated beside it, not ranked as a method
    variant_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
