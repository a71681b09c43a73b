"""Out-of-distribution detection with the linear head of a ``linear`` task (``head_task``).

Main score: the maximum softmax probability of the head (Hendrycks & Gimpel, ICLR 2017) separating the ID test set
(``test``, the head task's test set) from the OOD set (``ood``), via ``metrics.ood_metrics`` (AUROC main, AUPR-In,
AUPR-Out, FPR at 95% TPR of ID; OOD positive). For ImageNet-O (Hendrycks et al., "Natural Adversarial Examples",
CVPR 2021) the ID set is the ImageNet val images of ImageNet-O's 200 classes and the logits are restricted to those
200 classes before the softmax (``id_classes``). Extra scores on the same restricted logits: max logit (Hendrycks
et al., ICML 2022), energy (Liu et al., NeurIPS 2020), and the k-th nearest-neighbour distance to the training
features (Sun et al., ICML 2022).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.folder import read_lines
from ..data.subsets import resolve_split_file
from ..errors import CardError, DataError
from .base import Task, TaskContext, TaskOutput, register_kind
from .lowshot import labelled_subset
from .shared_head import shared_linear_head

log = logging.getLogger(__name__)

SCORES = ("msp", "maxlogit", "energy", "knn")


@dataclass(frozen=True)
class OODParams:
    head_task: str = ""  # the linear task whose head gives the logits (e.g. "digits_linear")
    id_classes: str = ""  # file of ID class names (e.g. "imagenet_o_wnids.txt"); empty: all classes of `test`
    knn_k: int = 1  # Sun et al. 2022: k = 1000 with the full ImageNet train set, k = 10 with a 1% sample
    knn_layer: str = "cls"  # final-norm CLS, L2-normalised (Sun et al. use the penultimate, normalised features)
    knn_subset_file: str = ""  # train bank for the k-NN score, e.g. SimCLR's 1% file (Sun et al.'s alpha = 1%)
    energy_temperature: float = 1.0  # Liu et al. 2020: T = 1
    hist_bins: int = 20  # histogram of MSP confidences in the extras (plots)


def _histogram(values: np.ndarray, bins: int) -> dict[str, Any]:
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    q = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95]).tolist() if len(values) else []
    return {"edges": edges.tolist(), "counts": counts.tolist(),
            "quantiles": dict(zip(["5", "25", "50", "75", "95"], q))}


def class_indices(names_file: str, class_names: list[str], data_root: Any) -> np.ndarray:
    """Label indices of the classes listed in ``names_file`` (one class name per line) within ``class_names``."""
    wanted = read_lines(resolve_split_file(names_file, data_root))
    pos = {c: i for i, c in enumerate(class_names)}
    missing = [w for w in wanted if w not in pos]
    if missing:
        raise DataError(f"{len(missing)} classes of {names_file} (e.g. {missing[:3]}) are not classes of the ID set")
    return np.array([pos[w] for w in wanted], dtype=np.int64)


@register_kind("ood")
class OODTask(Task):
    """OOD detection: ``auroc`` (MSP, main), ``aupr_in``, ``aupr_out``, ``fpr95``; the same four for
    ``maxlogit_*``, ``energy_*``, ``knn_*``; ``id_top1`` of the (restricted) head on the ID set."""

    roles = ("train", "test", "ood")
    Params = OODParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not params.head_task:
            raise CardError(f"Card {spec.card!r}: protocol field 'head_task' must name a linear task")
        if params.knn_k < 1 or params.hist_bins < 1 or not params.energy_temperature > 0:
            raise CardError(f"Card {spec.card!r}: 'knn_k' and 'hist_bins' must be >= 1, 'energy_temperature' > 0")

    def metric_names(self) -> list[str]:
        four = ("auroc", "aupr_in", "aupr_out", "fpr95")
        return list(four) + [f"{s}_{m}" for s in SCORES[1:] for m in four] + ["id_top1"]

    def run(self, ctx: TaskContext) -> TaskOutput:
        from ..metrics import (
            energy_confidence, knn_distance_confidence, max_logit_confidence, msp_confidence, ood_metrics,
        )

        p = self.params
        ds = self.spec.datasets
        shared = shared_linear_head(ctx, p.head_task, card=self.spec.card, train_ref=ds["train"], test_ref=ds["test"])
        id_feats = ctx.features(ds["test"], shared.layer)
        ood_feats = ctx.features(ds["ood"], shared.layer)
        id_labels = np.asarray(id_feats.labels)
        keep = np.arange(len(id_labels))
        classes = np.arange(shared.num_classes)
        if p.id_classes:
            wanted = class_indices(p.id_classes, ctx.dataset(ds["test"]).class_names, ctx.data_root)
            classes = wanted[wanted < shared.num_classes]  # on a full ImageNet all 200 are head outputs
            if len(classes) < len(wanted):  # a partial layout: the head has no output for the highest labels
                log.warning("%s: the head has outputs for %d of the %d classes of %s", self.spec.name, len(classes),
                            len(wanted), p.id_classes)
            keep = np.flatnonzero(np.isin(id_labels, classes))
            if len(keep) == 0:
                raise DataError(f"{self.spec.name}: no image of the ID set belongs to the classes of {p.id_classes}")
        id_logits = shared.head.logits(id_feats.features[keep])[:, classes]
        ood_logits = shared.head.logits(ood_feats.features)[:, classes]
        conf = {
            "msp": (msp_confidence(id_logits), msp_confidence(ood_logits)),
            "maxlogit": (max_logit_confidence(id_logits), max_logit_confidence(ood_logits)),
            "energy": (energy_confidence(id_logits, p.energy_temperature),
                       energy_confidence(ood_logits, p.energy_temperature)),
        }
        bank = ctx.features(ds["train"], p.knn_layer)
        if p.knn_subset_file:  # read only the subset's rows of the (memory-mapped) bank
            sub = labelled_subset(ctx, ds["train"], np.asarray(bank.labels), p.knn_subset_file, 0.0, self.spec.card)
            bank_x = np.asarray(bank.features[sub.indices])
        else:
            bank_x = np.asarray(bank.features)
        id_knn = np.asarray(ctx.features(ds["test"], p.knn_layer).features)[keep]
        ood_knn = np.asarray(ctx.features(ds["ood"], p.knn_layer).features)
        k = min(p.knn_k, len(bank_x))
        conf["knn"] = (knn_distance_confidence(bank_x, id_knn, k=k), knn_distance_confidence(bank_x, ood_knn, k=k))
        metrics: dict[str, float] = {}
        for name, (c_id, c_ood) in conf.items():
            prefix = "" if name == "msp" else f"{name}_"
            metrics.update({f"{prefix}{m}": v for m, v in ood_metrics(c_id, c_ood).items()})
        # Accuracy of the restricted head on the ID images (labels mapped into the restricted class order).
        pos = {int(c): i for i, c in enumerate(classes)}
        y_restricted = np.array([pos[int(y)] for y in id_labels[keep]])
        metrics["id_top1"] = float((id_logits.argmax(1) == y_restricted).mean())
        extras = {
            "n_id": int(len(keep)), "n_ood": int(len(ood_logits)),
            "msp_hist": {"id": _histogram(conf["msp"][0], p.hist_bins), "ood": _histogram(conf["msp"][1], p.hist_bins)},
            "head": {"task": shared.task.name, "lr": shared.head.lr, "val_top1": shared.head.val_top1,
                     "classes": int(len(classes))},
            "knn_k": k,
        }
        return TaskOutput(metrics, extras)
