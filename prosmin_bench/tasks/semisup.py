"""Semi-supervised classification: fine-tune backbone + linear head on a labelled subset, evaluate on test.

Protocol (docs/protocols.md "Semi-supervised"; iBOT ``evaluation/README.md``:58-67 and
``evaluation/semi_supervised/eval_cls.py``): the SimCLR 1% / 10% ImageNet splits, end-to-end fine-tuning with the
DeiT recipe (RandAugment, Mixup / CutMix, random erasing, label smoothing, drop path; ``tasks/finetune.py``), iBOT's
lr 5e-6 for 1000 epochs at batch 1024, from the first layer of the projection head (``finetune_head_layer = 1``).
Official checkpoints carry no projection head, so for them the head sits on the final-norm CLS token, as in DINO's
fine-tuning (one warning; ``extras["finetune_head_layer_used"]`` says which ran); checkpoints of the suite's
pretraining keep the head. The loop and its model selection (best epoch on a held-out part of the labelled subset,
never the test set) are ``tasks/finetune.py``; subsets are ``data/subsets.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.base import DatasetRef
from ..data.subsets import SubsetImageDataset, check_covers
from ..metrics import ScoreSamples
from .base import Task, TaskContext, TaskOutput, classification_samples, register_kind
from .finetune import FinetuneParams, check_finetune_params, finetune, predict
from .probes import check_subset_params, classification_metrics, labelled_subset, reliability_extras, softmax


@dataclass(frozen=True)
class SemisupParams(FinetuneParams):
    subset_file: str = ""  # SimCLR split file (shipped name or path); empty: stratified draw of `fraction`
    fraction: float = 0.0  # labelled fraction for the stratified draw (seeded)


def evaluate_finetuned(ctx: TaskContext, result: Any, test_ref: DatasetRef, params: FinetuneParams,
                       num_classes: int, main_score: str = "top1",
                       ) -> tuple[dict[str, float], dict[str, Any], ScoreSamples | None]:
    """Test metrics of a fine-tuned classifier (the model's eval transform), extras for plots, and the per-image
    values of ``main_score`` (``classification_samples``)."""
    test = ctx.dataset(test_ref)
    logits, y = predict(result.model, test.with_transform(ctx.model.transform),
                        batch_size=ctx.settings.batch_size, device=ctx.device,
                        num_workers=ctx.settings.num_workers)
    probs = softmax(logits)
    metrics = classification_metrics(probs, y, params.n_bins)
    metrics.update({"val_top1": result.val_top1, "best_epoch": float(result.best_epoch)})
    extras = {"history": result.history, "reliability": reliability_extras(probs, y, params.n_bins),
              "recipe": result.recipe, "finetune_head_layer_used": result.recipe["finetune_head_layer_used"]}
    return metrics, extras, classification_samples(main_score, probs, y)


def run_finetune(ctx: TaskContext, train_set: Any, test_ref: DatasetRef, params: FinetuneParams, name: str,
                 main_score: str = "top1") -> TaskOutput:
    """Fine-tune on ``train_set`` and evaluate on ``test_ref`` (shared by the semisup and transfer kinds); the
    output's samples are the per-image values of ``main_score``."""
    test_labels = np.asarray(ctx.dataset(test_ref).labels)
    num_classes = int(max(np.max(train_set.labels), test_labels.max())) + 1
    result = finetune(ctx.model, train_set, np.asarray(train_set.labels), num_classes, params, seed=ctx.seed,
                      device=ctx.device, num_workers=ctx.settings.num_workers, precision=ctx.settings.precision,
                      desc=f"{ctx.model.spec.name} {name}")
    metrics, extras, samples = evaluate_finetuned(ctx, result, test_ref, params, num_classes, main_score)
    return TaskOutput(metrics, extras, samples)


@register_kind("semisup")
class SemisupTask(Task):
    """Fine-tuning on a labelled subset: ``top1``, ``top5`` (C >= 5), ``nll``, ``ece``, ``val_top1``,
    ``best_epoch``, ``n_labelled``."""

    roles = ("train", "test")
    Params = SemisupParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        check_finetune_params(spec, params)
        check_subset_params(spec, params.subset_file, params.fraction)

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "val_top1", "best_epoch", "n_labelled"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        train_ref, test_ref = self.spec.refs["train"], self.spec.refs["test"]
        train = ctx.dataset(train_ref)
        subset = labelled_subset(ctx, train_ref, np.asarray(train.labels), p.subset_file, p.fraction, self.spec.card)
        labelled = SubsetImageDataset(train, subset.indices)
        test = ctx.dataset(test_ref)
        check_covers(labelled.labels, np.asarray(test.labels), test.class_names, f"{self.spec.name} (seed {ctx.seed})")
        out = run_finetune(ctx, labelled, test_ref, p, self.spec.name, self.spec.main_score)
        out.metrics["n_labelled"] = float(len(subset))
        out.extras["subset"] = subset.info
        return out
