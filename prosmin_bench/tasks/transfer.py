"""Transfer learning by fine-tuning (DINO / iBOT protocol: fine-tune the whole network on the target set with the
DeiT recipe from timm's objects: RandAugment, Mixup / CutMix, random erasing, label smoothing, drop path; iBOT
``evaluation/eval_cls.py`` and ``run.sh``, DINO issues #81 / #171; the head on the final-norm CLS token).

The frozen-feature variant is a plain ``linear`` task on the transfer set (``transfer_*_linear`` cards): the same
cached-feature probe as ``imagenet_linear``, a separate task with its own column. The loop is ``tasks/finetune.py``;
datasets are ``data/transfer.py`` (local class folders or HF hub ids) and the bundled ``lfw`` for the mini scale.
"""

from __future__ import annotations

from .base import Task, TaskContext, TaskOutput, register_kind
from .finetune import FinetuneParams, check_finetune_params
from .semisup import run_finetune


@register_kind("transfer_finetune")
class TransferFinetuneTask(Task):
    """Fine-tune backbone + linear head on the target's train split: ``top1``, ``top5`` (C >= 5), ``nll``,
    ``ece``, ``val_top1``, ``best_epoch``."""

    roles = ("train", "test")
    Params = FinetuneParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        check_finetune_params(spec, params)

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "val_top1", "best_epoch"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        train = ctx.dataset(self.spec.refs["train"])
        return run_finetune(ctx, train, self.spec.refs["test"], self.params, self.spec.name, self.spec.main_score)
