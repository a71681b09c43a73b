"""Your own model without a card: any ``torch.nn.Module`` that maps images ``[B, 3, H, W]`` to features ``[B, D]``.

``prosmin_bench.evaluate(module, tasks, name="my_model", transform=...)`` and ``prosmin-bench run --model
module:<python.path>:<callable>`` both come here: :func:`as_backbone` wraps the module in :class:`ModuleBackbone`,
the Backbone face tasks read through. Its identity is the sha256 of the module's state dict (so a changed module is
never served a record or cached features of the old one) and its preprocessing, which the record states
(``model_info["module"]``, ``model_info["preprocess"]``).

Tasks that need more than the final features: ``cls_lastN`` (DINO's linear probe on the last N blocks' CLS tokens)
works when the module has DINO's hook ``get_intermediate_layers(images, n)`` returning the last ``n`` blocks'
outputs after the final norm, each ``[B, T, D]`` (token 0 is used, DINO ``eval_linear.py``) or ``[B, D]``;
predictive and projection heads exist only for the pretraining module's checkpoints. Any other need fails with one
line saying what the module must provide.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

from ..errors import ProsminBenchError, one_line
from ..registry import NAME_RULE, TIMM_FOLDER_PREFIX, is_safe_name
from .backbone import Backbone, parse_layer
from .spec import MINI_PREPROCESS, ModelSpec, Preprocess, WeightsSource
from .weights import sha256_state_dict

#: ``--model module:<python.path>:<callable>``: a factory in the user's code.
MODULE_PREFIX = "module:"


@dataclasses.dataclass(frozen=True)
class CustomPreprocess(Preprocess):
    """A user's own transform (PIL image -> tensor [3, H, W]) in place of the fields of :class:`Preprocess`; its
    ``description`` (the transform's repr) enters feature cache keys and the record."""

    transform: Any = None
    description: str = ""

    def build(self) -> Any:
        return self.transform

    def problem(self) -> tuple[str, str] | None:
        return None

    def key(self) -> str:
        return f"custom:{self.description}"


def describe_preprocess(pre: Preprocess) -> str:
    """What the record says of a model's eval preprocessing."""
    return pre.key()


def expected_size(module: nn.Module) -> int | None:
    """The input size a module states (timm's ``pretrained_cfg["input_size"]``, ``patch_embed.img_size``,
    ``img_size``), or None."""
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    for owner in (getattr(module, "patch_embed", None), module):
        size = getattr(owner, "img_size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and size and isinstance(size[-1], int)):
            return int(size if isinstance(size, int) else size[-1])
    return None


def default_preprocess(module: nn.Module, suites: Iterable[str]) -> Preprocess:
    """The tasks' standard preprocessing at the module's expected size: mini tasks feed the 32-px images as they
    are (mean/std 0.5); ImageNet tasks DINO's eval preprocessing, Resize(crop * 256 / 224) + CenterCrop(crop)."""
    size = expected_size(module)
    if set(suites) <= {"mini"}:
        return MINI_PREPROCESS if size in (None, 32) else dataclasses.replace(MINI_PREPROCESS, resize=size, crop=size)
    crop = size or 224
    return Preprocess(resize=round(crop * 256 / 224), crop=crop)


def check_model_name(name: Any, taken: Callable[[str], bool] = lambda n: False) -> str:
    """``name`` if it can name records of a user's model (a safe folder name, not a registered model's)."""
    if name is None:
        raise ProsminBenchError("Expected `name` for an nn.Module (it names its records), e.g. name='my_vit'")
    if not is_safe_name(name) or name.startswith(TIMM_FOLDER_PREFIX):
        raise ProsminBenchError(f"Expected `name` of {NAME_RULE} (not starting with {TIMM_FOLDER_PREFIX!r}), but got "
                                f"{name!r}")
    if taken(name):
        raise ProsminBenchError(f"Expected `name` that is not a registered model's (see `prosmin-bench list models`), "
                                f"but got {name!r}; pick another name")
    return name


class ModuleBackbone(Backbone):
    """A user's ``nn.Module`` (images ``[B, 3, H, W]`` -> features ``[B, D]``) with the Backbone face.

    Args:
        spec: its ModelSpec (``arch`` = ``module:<class>``, ``preprocess`` its eval preprocessing).
        net: the module; it is put in eval mode with gradients off (in place, not copied).
        weights_sha256: sha256 of its state dict.
    """

    def __init__(self, spec: ModelSpec, net: nn.Module, weights_sha256: str) -> None:
        super().__init__(spec, net, weights_sha256)
        self.is_vit, self.layerless = False, False

    @property
    def record_info(self) -> dict[str, Any]:
        """What the record adds to ``model_info``: the module's class and its preprocessing."""
        return {"module": self.spec.arch[len(MODULE_PREFIX):], "preprocess": describe_preprocess(self.spec.preprocess)}

    def layer_dim(self, layer: str) -> int:
        width = getattr(self.net, "num_features", getattr(self.net, "embed_dim", None))
        if not isinstance(width, int):
            raise ProsminBenchError(f"Model {self.spec.name!r} does not state its feature width (num_features)")
        return width * parse_layer(layer)[1]

    def features(self, images: torch.Tensor, layer: str = "cls") -> torch.Tensor:
        """images [N, 3, H, W] -> the module's features [N, D] (``cls``), or ``cls_lastN`` through its
        ``get_intermediate_layers`` hook (module docstring): [N, D * n]."""
        kind, n = parse_layer(layer)
        if kind == "cls" and n == 1:
            return self._check(self.net(images), layer)
        hook = getattr(self.net, "get_intermediate_layers", None)
        if kind != "cls" or hook is None:
            raise ProsminBenchError(
                f"Model {self.spec.name!r}: this task needs feature layer {layer!r}; the module gives final features "
                "only: add `get_intermediate_layers(images, n)` returning the last n blocks' normed outputs (as "
                "DINO's ViT), or evaluate it on tasks that use 'cls'"
            )
        outs = list(hook(images, n))
        if len(outs) != n:
            raise ProsminBenchError(f"Model {self.spec.name!r}: get_intermediate_layers(images, {n}) returned "
                                    f"{len(outs)} outputs, expected {n}")
        return self._check(torch.cat([o[:, 0] if o.dim() == 3 else o for o in outs], dim=-1), layer)

    def _check(self, out: Any, layer: str) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ProsminBenchError(f"Model {self.spec.name!r}: expected features [B, D] in layer {layer!r}, but the "
                                    f"module returned {got}; return one feature vector per image")
        return out

    def with_preprocess(self, preprocess: Preprocess) -> "ModuleBackbone":
        if isinstance(self.spec.preprocess, CustomPreprocess):
            raise ProsminBenchError(
                f"Model {self.spec.name!r}: this task changes the eval preprocessing ({preprocess.key()}), which a "
                "custom `transform` does not describe; evaluate it with transform=None or through a model card"
            )
        return ModuleBackbone(dataclasses.replace(self.spec, preprocess=preprocess), self.net, self.weights_sha256)

    def trainable_copy(self) -> "ModuleBackbone":
        if isinstance(self.spec.preprocess, CustomPreprocess):
            raise ProsminBenchError(
                f"Model {self.spec.name!r}: fine-tuning builds its training augmentation from the preprocessing's "
                "crop, mean and std, which a custom `transform` does not state; use transform=None or a model card"
            )
        twin = ModuleBackbone(self.spec, copy.deepcopy(self.net), self.weights_sha256)
        twin.requires_grad_(True)
        return twin.train()


def as_backbone(module: nn.Module, *, name: str | None = None, transform: Callable[[Any], torch.Tensor] | None = None,
                suites: Iterable[str] = ("mini",), taken: Callable[[str], bool] = lambda n: False) -> Backbone:
    """A Backbone for ``module`` (a Backbone is returned as it is).

    Args:
        module: maps images [B, 3, H, W] (after ``transform``) to features [B, D].
        name: names its records (required; a safe folder name that no registered model has).
        transform: PIL image -> tensor [3, H, W]; default :func:`default_preprocess` for the tasks' ``suites``.
        taken: whether a name is a registered model's.
    """
    if isinstance(module, Backbone):
        if name is not None or transform is not None:
            raise ProsminBenchError(f"Model {module.spec.name!r} is a Backbone with its own name and preprocessing; "
                                    "pass `name` and `transform` only with a plain nn.Module")
        return module
    if not isinstance(module, nn.Module):
        raise ProsminBenchError(f"Expected a model name, a ModelSpec or a torch.nn.Module, but got "
                                f"{type(module).__name__}")
    name = check_model_name(name, taken)
    if transform is None:
        pre: Preprocess = default_preprocess(module, suites)
    elif callable(transform):
        pre = CustomPreprocess(resize=None, transform=transform, description=repr(transform))
    else:
        raise ProsminBenchError(f"Expected `transform` to be a callable (PIL image -> tensor), but got "
                                f"{type(transform).__name__}")
    cls = type(module)
    spec = ModelSpec(name=name, arch=f"{MODULE_PREFIX}{cls.__module__}.{cls.__qualname__}",
                     weights=WeightsSource(), preprocess=pre, scale="imagenet" if set(suites) - {"mini"} else "mini",
                     method="custom", description=f"user nn.Module {cls.__qualname__}")
    return ModuleBackbone(spec, module, sha256_state_dict(module.state_dict()))


def load_factory(ref: str) -> tuple[nn.Module, Any, str]:
    """``module:<python.path>:<callable>`` -> (module, transform or None, default name ``<python.path>.<callable>``).

    The callable takes no argument and returns an ``nn.Module`` or ``(nn.Module, transform)``."""
    parts = ref[len(MODULE_PREFIX):].split(":") if ref.startswith(MODULE_PREFIX) else []
    if len(parts) != 2 or not all(parts):
        raise ProsminBenchError(f"Expected --model module:<python.path>:<callable> (e.g. module:mypkg.models:build), "
                                f"but got {ref!r}")
    path, attr = parts
    try:
        factory = getattr(importlib.import_module(path), attr)
    except ImportError as exc:
        why = f"Model {ref!r}: cannot import {path!r} ({one_line(exc)}); check that it is on PYTHONPATH"
        raise ProsminBenchError(why) from None
    except AttributeError:
        raise ProsminBenchError(f"Model {ref!r}: module {path!r} has no {attr!r}") from None
    out = factory()
    module, transform = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
    if not isinstance(module, nn.Module):
        raise ProsminBenchError(f"Model {ref!r}: expected the factory to return an nn.Module or (nn.Module, "
                                f"transform), but got {type(out).__name__}")
    return module, transform, f"{path}.{attr}"


def resolve_models(models: list[Any], *, name: str | None, transform: Any, suites: Iterable[str],
                   spec_of: Callable[[Any], ModelSpec]) -> list[tuple[ModelSpec, Backbone | None]]:
    """Each model argument -> (its spec, its built Backbone or None for a registered model that the run loads).

    ``models``: names, ModelSpecs, ``module:`` factory references, nn.Modules or Backbones; ``spec_of`` resolves a
    registered name (close matches on a typo). ``name`` and ``transform`` apply to the one nn.Module given."""
    suites = list(suites)
    modules = [m for m in models if isinstance(m, nn.Module) and not isinstance(m, Backbone)]
    if (name is not None or transform is not None) and len(modules) != 1:
        raise ProsminBenchError(f"Expected exactly one nn.Module with `name` / `transform`, but got {len(modules)}; "
                                "evaluate one module per call")

    def taken(n: str) -> bool:
        try:
            spec_of(n)
        except ProsminBenchError:
            return False
        return True

    out: list[tuple[ModelSpec, Backbone | None]] = []
    for m in models:
        if isinstance(m, str) and m.startswith(MODULE_PREFIX):
            module, tf, default_name = load_factory(m)
            built: Backbone | None = as_backbone(module, name=default_name, transform=tf, suites=suites, taken=taken)
        elif isinstance(m, nn.Module):
            built = as_backbone(m, name=name, transform=transform, suites=suites, taken=taken)
        else:
            built = None
        out.append((built.spec, built) if built is not None else (m if isinstance(m, ModelSpec) else spec_of(m), None))
    return out
