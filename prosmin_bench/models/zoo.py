"""Named models: the built-in micro models (registered here) and the ``baselines/*.toml`` model cards.

Architecture and weights have separate names: ``vit_micro`` is an architecture; ``prosmin_micro`` is that
architecture with the weights of the ``prosmin_micro`` pretraining recipe.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import PurePosixPath
from urllib.parse import urlparse

from .. import cards
from ..errors import CardError, ProsminBenchError, UnknownNameError
from ..registry import NAME_RULE, TIMM_FOLDER_PREFIX, TIMM_PREFIX, Registry, is_safe_name, model_folder_name
from .architectures import ARCHITECTURES
from .backbone import parse_layer
from .converters import CONVERTERS, NETWORK_CHOICES
from .spec import MINI_PREPROCESS, ModelSpec, Preprocess, WeightsSource

log = logging.getLogger(__name__)

#: Models defined in code (the micro models). Card models join them in ``catalogue()``.
BUILTIN_MODELS: Registry[ModelSpec] = Registry("model", "prosmin-bench list models")


def register_model_spec(spec: ModelSpec) -> ModelSpec:
    return BUILTIN_MODELS.add(spec.name, spec, origin=__name__)


# Mini-scale models: the micro ViT, untrained or pretrained by the suite's own recipes on the digits train split.
register_model_spec(ModelSpec(
    name="random_micro", arch="vit_micro", weights=WeightsSource(random=True, seed=0), preprocess=MINI_PREPROCESS,
    scale="mini", method="random",
    description="vit_micro with timm's default random init (seed 0): the untrained floor every method must beat",
))
register_model_spec(ModelSpec(
    name="random_sincos_micro", arch="vit_micro", weights=WeightsSource(random=True, seed=0, init="mocov3"),
    preprocess=MINI_PREPROCESS, scale="mini", method="random",
    description="vit_micro with MoCo-v3's ViT init (vits.py: xavier-uniform linears, qkv as three blocks, uniform "
    "patch projection with zero bias; seed 0) and its fixed 2-D sin-cos position embedding: the initialisation every "
    "*_micro recipe starts from, so a method's gain over it is learned",
))
for _method, _label in (("prosmin", "ProSMin"), ("dino", "DINO"), ("ibot", "iBOT"), ("mocov3", "MoCo-v3")):
    register_model_spec(ModelSpec(
        name=f"{_method}_micro", arch="vit_micro", weights=WeightsSource(recipe=f"{_method}_micro"),
        preprocess=MINI_PREPROCESS, scale="mini", method=_method, pretrained_on=("digits:train",),
        description=f"vit_micro pretrained with {_label} on the digits train split by `prosmin-bench pretrain "
        f"--recipe {_method}_micro` (" + {
            "prosmin": "online encoder, as the ProSMin paper's Sec. 6",
            "mocov3": "base (online) encoder, as MoCo-v3's main_lincls.py",
        }.get(_method, "teacher (target) backbone, as its eval scripts' --checkpoint_key teacher") + ")",
    ))

# ProSMin's target (EMA) network, the explicit variant of prosmin_micro (issue 19): the same recipe checkpoint (no
# pretraining of its own), evaluated through the target network instead of the online one the paper freezes.
register_model_spec(ModelSpec(
    name="prosmin_target_micro", arch="vit_micro", weights=WeightsSource(recipe="prosmin_micro", network="target"),
    preprocess=MINI_PREPROCESS, scale="mini", method="prosmin", pretrained_on=("digits:train",),
    variant_of="prosmin_micro",
    description="variant of prosmin_micro, not a method of its own: the same `prosmin_micro` checkpoint evaluated "
    "through its target (EMA) backbone and projection head instead of the online encoder of the paper's Sec. 6 (as "
    "the released eval_linear.py's `target` key); no predictor, so no sigma metrics",
))

# ProSMin with the augmentation its paper's text states (issue 19 item 6; pretrain/recipes.py
# ``prosmin_paperaug_micro``): prosmin_micro's objective and knobs, only the views changed.
register_model_spec(ModelSpec(
    name="prosmin_paperaug_micro", arch="vit_micro", weights=WeightsSource(recipe="prosmin_paperaug_micro"),
    preprocess=MINI_PREPROCESS, scale="mini", method="prosmin", pretrained_on=("digits:train",),
    description="vit_micro pretrained with ProSMin on the digits train split by `prosmin-bench pretrain --recipe "
    "prosmin_paperaug_micro`: prosmin_micro with the augmentation of the paper's text (crops 0.8-1 of the area, "
    "colour jitter 0.8/0.8/0.8, blur p=0.5) instead of the digit-specific views (online encoder, as prosmin_micro)",
))

# Non-learned references (issue 17): where raw pixels sit places every learned model's numbers. Tabulated, never
# ranked (``reference=True``). No weights file: ``weights_sha256`` is the hash of the fixed state (input shape and
# projection matrix), as for the random models.
register_model_spec(ModelSpec(
    name="pixels", arch="pixels", weights=WeightsSource(random=True, seed=0), preprocess=MINI_PREPROCESS,
    scale="mini", method="reference", reference=True,
    description="reference, not learned: the raw pixels after the eval preprocessing (32x32 RGB, mean/std 0.5), "
    "flattened to 3,072 features, served as every feature layer a task asks for (cls, cls_last4, ...); fine-tuning "
    "tasks train only the head",
))
register_model_spec(ModelSpec(
    name="pixels_randproj", arch="pixels_randproj", weights=WeightsSource(random=True, seed=0),
    preprocess=MINI_PREPROCESS, scale="mini", method="reference", reference=True,
    description="reference, not learned: a fixed Gaussian random projection (torch seed 0, scaled 1/sqrt(384)) of "
    "the 3,072 pixels of `pixels` to 384 dimensions, the width of the micro ViTs' linear-probe input (cls_last4 = "
    "4 x 96); served as every feature layer; fine-tuning tasks train only the head",
))

_MODEL_FIELDS = {
    "name", "arch", "arch_kwargs", "weights", "converter", "feature_layer", "preprocess", "scale", "method",
    "pretrained_on", "paper", "licence", "description", "reported", "variant_of",
}
_WEIGHTS_FIELDS = {"url", "filename", "sha256", "format", "recipe", "random", "seed", "init", "network"}
_RANDOM_INITS = ("timm", "sincos", "mocov3")
_PREPROCESS_FIELDS = {"resize", "crop", "interpolation", "mean", "std"}


def spec_from_card(card: cards.Card) -> ModelSpec:
    """Parse a model card; every error names the file and the field."""
    cards.check_known_fields(card, _MODEL_FIELDS)
    f = lambda key, typ, default=cards._MISSING: cards.field(card, key, typ, default)  # noqa: E731
    weights = f("weights", dict, {})
    unknown = sorted(set(weights) - _WEIGHTS_FIELDS)
    if unknown:
        raise CardError(f"Card {str(card.path)!r}: unknown field(s) {unknown} in [weights]; allowed {sorted(_WEIGHTS_FIELDS)}")
    name = cards.name_field(card, "name")
    if name.startswith(TIMM_FOLDER_PREFIX):  # keeps the folder of timm:<name> one to one with its model
        raise CardError(f"Card {str(card.path)!r}: field 'name' must not start with {TIMM_FOLDER_PREFIX!r} (the "
                        f"results folder of timm:<name> models), but got {name!r}")
    src = WeightsSource(
        url=f("weights.url", str, None), filename=cards.name_field(card, "weights.filename", None),
        sha256=f("weights.sha256", str, None), format=f("weights.format", str, None),
        recipe=cards.name_field(card, "weights.recipe", None),
        random=f("weights.random", bool, False), seed=f("weights.seed", int, 0), init=f("weights.init", str, "timm"),
        network=f("weights.network", str, None),
    )
    if src.network is not None and (src.network not in NETWORK_CHOICES or not src.recipe):
        raise CardError(
            f"Card {str(card.path)!r}: field 'weights.network' must be one of {list(NETWORK_CHOICES)} and applies "
            f"only to this suite's pretraining checkpoints (weights.recipe), but got network = {src.network!r}"
            + ("" if src.recipe else " without a recipe")
        )
    if src.init not in _RANDOM_INITS or (src.init != "timm" and not src.random):
        raise CardError(
            f"Card {str(card.path)!r}: field 'weights.init' must be one of {list(_RANDOM_INITS)} and needs "
            f"random = true, but got init = {src.init!r}"
        )
    if sum([bool(src.url), bool(src.recipe), src.random]) != 1:
        raise CardError(
            f"Card {str(card.path)!r}: field 'weights' must set exactly one of url, recipe or random = true"
        )
    if src.url and not src.filename and not is_safe_name(PurePosixPath(urlparse(src.url).path).name):
        # the download is stored under the URL's file name in the weights cache
        raise CardError(
            f"Card {str(card.path)!r}: field 'weights.url' must end in a file name ({NAME_RULE}), or set "
            f"weights.filename; got {src.url!r}"
        )
    if src.sha256 is not None and (len(src.sha256) != 64 or any(c not in "0123456789abcdef" for c in src.sha256)):
        raise CardError(f"Card {str(card.path)!r}: field 'weights.sha256' must be 64 lowercase hex digits")
    pre = f("preprocess", dict, {})
    unknown = sorted(set(pre) - _PREPROCESS_FIELDS)
    if unknown:
        raise CardError(f"Card {str(card.path)!r}: unknown field(s) {unknown} in [preprocess]")
    default = Preprocess()
    preprocess = Preprocess(
        resize=f("preprocess.resize", int, default.resize), crop=f("preprocess.crop", int, default.crop),
        interpolation=f("preprocess.interpolation", str, default.interpolation),
        mean=tuple(f("preprocess.mean", list, list(default.mean))), std=tuple(f("preprocess.std", list, list(default.std))),
    )
    problem = preprocess.problem()
    if problem is not None:
        raise CardError(f"Card {str(card.path)!r}: field 'preprocess.{problem[0]}' {problem[1]}")
    preprocess = dataclasses.replace(preprocess, mean=tuple(map(float, preprocess.mean)),
                                     std=tuple(map(float, preprocess.std)))
    arch = f("arch", str)
    if arch.startswith(TIMM_PREFIX):
        if not _timm_exists(arch[len(TIMM_PREFIX):]):
            raise CardError(f"Card {str(card.path)!r}: field 'arch' names unknown timm model {arch!r} "
                            "(see timm.list_models())")
    elif arch not in ARCHITECTURES:
        raise CardError(f"Card {str(card.path)!r}: field 'arch': {ARCHITECTURES.unknown_message(arch)}; or use "
                        "'timm:<name>'")
    feature_layer = f("feature_layer", str, "cls")
    try:
        parse_layer(feature_layer)
    except ProsminBenchError as exc:
        raise CardError(f"Card {str(card.path)!r}: field 'feature_layer': {exc}") from None
    pretrained_on = f("pretrained_on", list, [])
    if not all(isinstance(d, str) for d in pretrained_on):
        raise CardError(f"Card {str(card.path)!r}: field 'pretrained_on' must be a list of dataset names, but got "
                        f"{pretrained_on!r}")
    scale = f("scale", str, "imagenet")
    if scale not in ("mini", "imagenet"):
        raise CardError(f"Card {str(card.path)!r}: field 'scale' must be 'mini' or 'imagenet', but got {scale!r}")
    converter = f("converter", str, src.format or "auto")
    if converter != "auto" and converter not in CONVERTERS:
        raise CardError(
            f"Card {str(card.path)!r}: field 'converter' names unknown format {converter!r}; known: {CONVERTERS.names()}"
        )
    return ModelSpec(
        name=name, arch=arch, arch_kwargs=dict(f("arch_kwargs", dict, {})), weights=src,
        converter=converter, feature_layer=feature_layer, preprocess=preprocess, scale=scale,
        method=f("method", str, ""), pretrained_on=tuple(pretrained_on), paper=f("paper", str, ""),
        licence=f("licence", str, ""), description=f("description", str, ""), reported=dict(f("reported", dict, {})),
        card=str(card.path), variant_of=cards.name_field(card, "variant_of", None),
    )


@cards.lazy_catalogue
def catalogue() -> Registry[ModelSpec]:
    """Every named model: built-ins, shipped cards and user cards (user cards may not shadow other names)."""
    reg: Registry[ModelSpec] = Registry("model", "prosmin-bench list models")
    for name, spec in BUILTIN_MODELS.items():
        reg.add(name, spec, origin="built-in")
    for card in cards.iter_cards("baselines"):
        spec = spec_from_card(card)
        reg.add(spec.name, spec, origin=str(card.path))
    for name, spec in reg.items():
        if spec.variant_of is not None and (spec.variant_of not in reg or spec.variant_of == name):
            why = "it names the model itself" if spec.variant_of == name else reg.unknown_message(spec.variant_of)
            raise CardError(f"Model {name!r} ({reg.origin(name)}): field 'variant_of' must name another model; {why}")
    return reg


def _timm_exists(arch: str) -> bool:
    """Whether timm knows ``arch`` (``<name>``, or ``<name>.<tag>``, which timm lists among pretrained names only);
    a pattern like ``vit_*`` is not a model."""
    import timm  # here, not at the top: a second or more to import, and needed only for timm:<name> models

    if arch.startswith("hf-hub:"):  # a Hugging Face repo timm can load: its folder name must be safe
        return model_folder_name(TIMM_PREFIX + arch) is not None
    return is_safe_name(arch) and bool(timm.list_models(arch) or timm.list_models(arch, pretrained=True))


def get_model_spec(name: str) -> ModelSpec:
    """The spec for a registered name, or an ad-hoc spec for ``timm:<name>[.<tag>]`` with timm's eval preprocessing
    (``models/timm_models.py``): ``<name>.<tag>`` has that tag's pretrained weights, a bare ``<name>`` timm's
    random init, unless weights are given."""
    if name.startswith(TIMM_PREFIX):
        from .timm_models import is_tagged, timm_preprocess

        arch = name[len(TIMM_PREFIX) :]
        if not _timm_exists(arch):
            raise UnknownNameError(f"Unknown timm model {arch!r} (see timm.list_models())")
        if is_tagged(arch):
            return ModelSpec(name=name, arch=name, weights=WeightsSource(), scale="imagenet",
                             preprocess=timm_preprocess(arch), description=f"timm {arch}, its pretrained weights")
        return ModelSpec(name=name, arch=name, weights=WeightsSource(random=True), method="random", scale="imagenet",
                         preprocess=timm_preprocess(arch),
                         description=f"timm {arch}, random init unless --weights is given")
    return catalogue().get(name)


def list_model_names() -> list[str]:
    return catalogue().names()

