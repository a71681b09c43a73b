"""Corruption robustness (Hendrycks & Dietterich, ICLR 2019) with the linear head of a ``linear`` task.

Top-1 error of the head on each of the 15 corruptions x 5 severities (protocol field ``corrupted``: a dataset
whose splits are ``<corruption>/<severity>``, e.g. ``digits_c`` or ``imagenet_c``) and on the clean test set;
CE_c = sum_s E_{s,c} / sum_s E^base_{s,c}, mCE = 100 * mean_c CE_c, relative mCE with the clean errors (``metrics.robustness``). All 15 corruptions and all 5
severities are required: a missing one is an error, never a mean over fewer.

Baselines (``baseline``):

- ``"alexnet"`` (ImageNet-C): AlexNet's errors per corruption and severity from ``_refdata/alexnet_c_errors.csv``,
  looked up by corruption name, and AlexNet's clean error 0.4345 (a third-party constant from Hendrycks &
  Dietterich's evaluation code, ``metrics.ALEXNET_CLEAN_ERROR``).
- ``"pixel_tree"`` (digits_c): AlexNet's numbers belong to ImageNet only, so the mini scale is normalised by a
  reference model the suite evaluates itself: a scikit-learn ``DecisionTreeClassifier(random_state=0)`` on the raw
  grey pixels (channel mean / 255) of the training split. It is deterministic, needs no weights, and, like AlexNet
  on ImageNet, is a weak model that every corruption hurts: measured on digits_c v1, clean error 0.139 and a
  summed degradation sum_s (E_s - E_clean) between 0.18 (jpeg_compression) and 3.5 (contrast), so every relative
  CE is defined. (A logistic regression on raw pixels was rejected: it averages the noise away and is not hurt by
  shot_noise or pixelate at all, which leaves relative mCE undefined.)

Extras: ``errors`` (per corruption, severities 1..5), ``ce``, ``relative_ce``, the ``baseline``'s name and errors,
``classes`` (C, the head's outputs) and ``chance_error`` (1 - 1/C, a uniform guess), for the corruption plots.

ImageNet-C images are stored at 224 px (Resize 256 + CenterCrop 224 at generation), so with ``resize = false``
features are extracted with the model's preprocessing minus its resize (CenterCrop + normalise only).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import config
from ..atomic import atomic_write_text
from ..data import DATASETS, DatasetRef
from ..data.folder import reference_file
from ..errors import CardError, DataError
from ..metrics import (
    ALEXNET_CLEAN_ERROR, CORRUPTIONS, ScoreSamples, expected_calibration_error, mean_corruption_error,
    negative_log_likelihood, relative_corruption_errors, relative_mean_corruption_error,
)
from ..metrics import corruption_errors as ce_per_corruption
from .base import Task, TaskContext, TaskOutput, register_kind
from .probes import shared_linear_head, softmax

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)
BASELINES = ("alexnet", "pixel_tree")
#: Bump when the pixel_tree reference changes (part of its cache key).
PIXEL_TREE_VERSION = 1


@dataclass(frozen=True)
class CorruptionParams:
    head_task: str = ""  # the linear task whose head classifies (e.g. "digits_linear")
    corrupted: str = ""  # dataset with splits "<corruption>/<severity>" (digits_c, imagenet_c)
    corruptions: tuple[str, ...] = CORRUPTIONS  # must be all 15 (mCE is a mean over all of them)
    severities: tuple[int, ...] = SEVERITIES  # must be 1..5
    baseline: str = "alexnet"  # "alexnet" (ImageNet-C) or "pixel_tree" (the suite's own reference, mini scale)
    resize: bool = True  # false for ImageNet-C: images are 224 px already (CenterCrop + normalise only)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)


def alexnet_errors() -> dict[str, tuple[float, ...]]:
    """AlexNet top-1 error per corruption (by name) and severity 1..5 from ``_refdata/alexnet_c_errors.csv``."""
    path = reference_file("alexnet_c_errors.csv")
    with open(path, newline="") as f:
        rows = {r["corruption"]: tuple(float(r[f"severity_{s}"]) for s in SEVERITIES) for r in csv.DictReader(f)}
    missing = [c for c in CORRUPTIONS if c not in rows]
    if missing:
        raise DataError(f"{path} lacks AlexNet errors for {missing}; reinstall prosmin-bench")
    return {c: rows[c] for c in CORRUPTIONS}


def _grey_pixels(ds: Any) -> np.ndarray:
    """Raw grey pixels [N, H*W] in [0, 1] (channel mean) of an image dataset whose images share one size."""
    images = getattr(ds, "images", None)
    if images is None:
        images = np.stack([np.asarray(ds.get_image(i), dtype=np.uint8) for i in range(len(ds))])
    if images.ndim != 4:
        raise DataError("The pixel_tree baseline needs images of one size (the mini data); use baseline = 'alexnet'")
    return images.astype(np.float64).mean(axis=3).reshape(len(images), -1) / 255.0


def _atomic_write_json(path: Any, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def corrupted_ref(dataset: str, corruption: str, severity: int) -> DatasetRef:
    """``"digits_c", "fog", 3`` -> the reference ``digits_c:fog/3``."""
    return DatasetRef(dataset, f"{corruption}/{severity}")


def check_same_images(ctx: TaskContext, task: str, test_ref: DatasetRef, corrupted: str) -> None:
    """Every ``<corruption>/<severity>`` split must hold the clean test set's images, class by class (ImageNet-C is
    ImageNet val under each corruption; digits_c is the digits test split). A split with fewer or more images,
    e.g. an archive extracted part-way, would give an error rate over another set of images and a wrong mCE, so
    it is refused with the splits named; the datasets are only listed here, before any feature is computed."""
    clean = ctx.dataset(test_ref)
    want = np.bincount(np.asarray(clean.labels), minlength=len(clean.class_names))
    bad = []
    for c in CORRUPTIONS:
        for s in SEVERITIES:
            split = ctx.dataset(corrupted_ref(corrupted, c, s))
            got = np.bincount(np.asarray(split.labels), minlength=len(want))
            n = max(len(got), len(want))
            diff = int((np.pad(got, (0, n - len(got))) != np.pad(want, (0, n - len(want)))).sum())
            if diff:
                bad.append(f"{c}/{s}: {len(split)} image(s), {diff} class(es) with another count")
    if bad:
        name = str(test_ref) if test_ref.registered else "the test set"
        raise DataError(
            f"{task}: {len(bad)} of {len(CORRUPTIONS) * len(SEVERITIES)} splits of {corrupted!r} do not hold the "
            f"clean test set's images ({name}: {len(clean)} images), e.g. {bad[:3]}; each split holds the same "
            "images class by class, so a download or extraction stopped part-way (of these splits or of the clean "
            f"set); expected {DATASETS.get(corrupted).layout}. Get the missing files: {DATASETS.get(corrupted).source}"
        )


def pixel_tree_reference(ctx: TaskContext, train_ref: DatasetRef, test_ref: DatasetRef,
                         corrupted: str) -> dict[str, Any]:
    """The pixel_tree reference model's errors: ``{"errors": {c: [5 errors]}, "clean_error": e}`` (cached)."""
    # Imported here: scikit-learn takes about a second to import, which only the mini-scale mCE pays.
    import sklearn
    from sklearn.tree import DecisionTreeClassifier

    train, test = ctx.dataset(train_ref), ctx.dataset(test_ref)
    refs = {(c, s): corrupted_ref(corrupted, c, s) for c in CORRUPTIONS for s in SEVERITIES}
    sets = {k: ctx.dataset(r) for k, r in refs.items()}
    blob = json.dumps({"v": PIXEL_TREE_VERSION, "sklearn": sklearn.__version__, "train": train.fingerprint,
                       "test": test.fingerprint, "c": [sets[k].fingerprint for k in sorted(sets)]}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    path = config.data_cache_dir() / "references" / f"pixel_tree-{key[:32]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("ignoring unreadable reference cache %s (%s)", path, exc)
    tree = DecisionTreeClassifier(random_state=0).fit(_grey_pixels(train), np.asarray(train.labels))

    def error(ds: Any) -> float:
        return float((tree.predict(_grey_pixels(ds)) != np.asarray(ds.labels)).mean())

    out = {
        "model": f"DecisionTreeClassifier(random_state=0) on raw grey pixels, v{PIXEL_TREE_VERSION}",
        "sklearn": sklearn.__version__, "clean_error": error(test),
        "errors": {c: [error(sets[(c, s)]) for s in SEVERITIES] for c in CORRUPTIONS},
    }
    _atomic_write_json(path, out)
    return out


def mce_samples(wrong_counts: dict[str, np.ndarray], base_errors: dict[str, Any]) -> np.ndarray:
    """Each test image's share of the mCE [N]: v_i = (100 / C) sum_c k_ic / A_c, with k_ic the number of severities
    under which image i is misclassified with corruption c and A_c = sum_s E^base_{s,c}. Since E_{s,c} is the mean
    over the N images of the errors, CE_c = (1/N) sum_i k_ic / A_c and mCE = 100 mean_c CE_c = mean_i v_i exactly
    (``metrics.mean_corruption_error``)."""
    return (100.0 / len(CORRUPTIONS)) * sum(wrong_counts[c] / float(np.sum(base_errors[c])) for c in CORRUPTIONS)


@register_kind("corruption")
class CorruptionTask(Task):
    """Corruption robustness: ``mce`` (main), ``relative_mce``, ``clean_error``, ``ce_<c>``, ``relative_ce_<c>``,
    ``error_<c>_s<k>`` for every corruption and severity, and mean ``corrupted_error`` / ``_nll`` / ``_ece``."""

    roles = ("train", "test")
    Params = CorruptionParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not params.head_task:
            raise CardError(f"Card {spec.card!r}: protocol field 'head_task' must name a linear task")
        missing = [c for c in CORRUPTIONS if c not in params.corruptions]
        unknown = [c for c in params.corruptions if c not in CORRUPTIONS]
        if missing or unknown or len(params.corruptions) != len(CORRUPTIONS):
            raise CardError(
                f"Card {spec.card!r}: protocol field 'corruptions' must list the 15 ImageNet-C corruptions once each "
                f"(mCE is a mean over all 15, never fewer); missing {missing}, unknown {unknown}"
            )
        if tuple(sorted(params.severities)) != SEVERITIES:
            raise CardError(f"Card {spec.card!r}: protocol field 'severities' must be [1, 2, 3, 4, 5]")
        if params.baseline not in BASELINES:
            raise CardError(f"Card {spec.card!r}: protocol field 'baseline' must be one of {list(BASELINES)}")
        if params.corrupted not in DATASETS:
            raise CardError(
                f"Card {spec.card!r}: protocol field 'corrupted': {DATASETS.unknown_message(params.corrupted)}"
            )
        splits = set(DATASETS.get(params.corrupted).splits)
        lacking = [f"{c}/{s}" for c in CORRUPTIONS for s in SEVERITIES if f"{c}/{s}" not in splits]
        if lacking:
            raise CardError(
                f"Card {spec.card!r}: protocol field 'corrupted' names {params.corrupted!r}, which lacks the splits "
                f"{lacking[:3]}...; it needs '<corruption>/<severity>' for all 15 x 5"
            )

    def metric_names(self) -> list[str]:
        names = ["mce", "relative_mce", "clean_error", "clean_nll", "clean_ece", "corrupted_error", "corrupted_nll",
                 "corrupted_ece"]
        names += [f"ce_{c}" for c in CORRUPTIONS] + [f"relative_ce_{c}" for c in CORRUPTIONS]
        return names + [f"error_{c}_s{s}" for c in CORRUPTIONS for s in SEVERITIES]

    def _baseline(self, ctx: TaskContext) -> tuple[dict[str, Any], float, str]:
        if self.params.baseline == "alexnet":
            return alexnet_errors(), ALEXNET_CLEAN_ERROR, "AlexNet (Hendrycks & Dietterich 2019)"
        ds = self.spec.refs
        ref = pixel_tree_reference(ctx, ds["train"], ds["test"], self.params.corrupted)
        return ref["errors"], float(ref["clean_error"]), ref["model"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        ds = self.spec.refs
        check_same_images(ctx, self.spec.name, ds["test"], p.corrupted)
        shared = shared_linear_head(ctx, p.head_task, card=self.spec.card, train_ref=ds["train"], test_ref=ds["test"])

        def evaluate(feats: Any) -> tuple[float, float, float, np.ndarray]:
            probs = softmax(shared.head.logits(feats.features))
            y = np.asarray(feats.labels)
            wrong = probs.argmax(1) != y  # [N], in the clean test set's image order (check_same_images)
            return (float(wrong.mean()), negative_log_likelihood(probs, y),
                    expected_calibration_error(probs, y, n_bins=p.n_bins), wrong)

        clean_error, clean_nll, clean_ece, _ = evaluate(ctx.features(ds["test"], shared.layer))
        # ImageNet-C's images are stored cropped already: with `resize = false` they go through the model's
        # preprocessing minus its resize (through the run's feature source, like every other feature set).
        pre = ctx.model.spec.preprocess
        variant = None if p.resize or pre.resize is None else dataclasses.replace(pre, resize=None)
        errors: dict[str, list[float]] = {}
        nlls, eces = [], []
        wrong_counts = {}  # corruption -> [N]: the severities under which each image is misclassified
        for c in CORRUPTIONS:
            errors[c] = []
            for s in SEVERITIES:
                ref = corrupted_ref(p.corrupted, c, s)
                feats = ctx.features(ref, shared.layer, preprocess=variant)
                e, nll, ece, wrong = evaluate(feats)
                wrong_counts[c] = wrong_counts.get(c, 0) + wrong.astype(np.float64)
                errors[c].append(e)
                nlls.append(nll)
                eces.append(ece)
        base_errors, base_clean, base_name = self._baseline(ctx)
        ce = ce_per_corruption(errors, baseline=base_errors)
        metrics: dict[str, float] = {
            "mce": mean_corruption_error(errors, baseline=base_errors),
            "clean_error": clean_error, "clean_nll": clean_nll, "clean_ece": clean_ece,
            "corrupted_error": float(np.mean([e for c in CORRUPTIONS for e in errors[c]])),
            "corrupted_nll": float(np.mean(nlls)), "corrupted_ece": float(np.mean(eces)),
        }
        undefined = [c for c in CORRUPTIONS if sum(base_errors[c]) - len(SEVERITIES) * base_clean <= 0]
        if undefined:  # relative CE divides by the baseline's degradation; it has none on these corruptions
            log.warning("%s: relative mCE undefined: the baseline is not hurt by %s", self.spec.name, undefined)
            rel: dict[str, float] = {c: float("nan") for c in CORRUPTIONS}
            metrics["relative_mce"] = float("nan")
        else:
            rel = relative_corruption_errors(errors, clean_error, baseline=base_errors, baseline_clean_error=base_clean)
            metrics["relative_mce"] = relative_mean_corruption_error(errors, clean_error, baseline=base_errors,
                                                                     baseline_clean_error=base_clean)
        for c in CORRUPTIONS:
            metrics[f"ce_{c}"] = ce[c]
            metrics[f"relative_ce_{c}"] = rel[c]
            for s, e in zip(SEVERITIES, errors[c]):
                metrics[f"error_{c}_s{s}"] = e
        extras = {
            "errors": errors, "ce": ce, "relative_ce": rel,
            "baseline": {"name": base_name, "errors": {c: list(base_errors[c]) for c in CORRUPTIONS},
                         "clean_error": base_clean},
            "relative_undefined_for": undefined,
            "head": {"task": shared.task.name, "lr": shared.head.lr, "val_top1": shared.head.val_top1},
            # the error of a uniform guess over the head's C classes: the corruption plots' chance line
            "classes": int(shared.num_classes), "chance_error": 1.0 - 1.0 / shared.num_classes,
        }
        samples = mce_samples(wrong_counts, base_errors) if self.spec.main_score == "mce" else None
        return TaskOutput(metrics, extras, ScoreSamples.mean("mce", samples) if samples is not None else None)
