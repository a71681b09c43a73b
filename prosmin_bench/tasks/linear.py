"""Linear probe on frozen, cached features (DINO eval_linear.py protocol, on centre-crop features).

Features: final-norm CLS of the last ``n`` blocks concatenated (DINO, ViT-S: n = 4 -> 1536-d). Head: one linear
layer, weights N(0, 0.01), zero bias; SGD momentum 0.9, weight decay 0, cosine schedule, lr scaled by
batch / 256 (PROTOCOLS.md "Linear"). DINO reports its best epoch on val; here the learning rate is chosen on a
held-out part of the training split (stratified, fixed by the seed), then the head is retrained on the whole
training split for the fixed number of epochs and evaluated once on test. The trained head is cached and reused
by the OOD and corruption tasks.

Uncertainty vs error (issue 10), for models with a predictive distribution (ProSMin checkpoints of the pretraining
module), with u_i = the mean predictive sigma of test image i over the K dimensions:

- ``sigma_err_spearman``: Spearman rank correlation between u_i and the probe's per-sample error, the negative
  log-likelihood -log p(y_i | x_i) of the true class (positive: sigma grows with the error);
- ``sigma_misclf_auroc``: AUROC of u_i for telling the probe's misclassified test images (positive) from its
  correct ones (Hendrycks & Gimpel, ICLR 2017, misclassification detection); 0.5 = sigma carries no signal.

Both come from ``prosmin_bench.metrics.uncertainty``; a metric that is undefined for a run (a constant sigma for
the correlation, a probe with no errors or no correct predictions for the AUROC) is left out with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import config
from ..errors import CardError, FeatureError
from ..results import inside
from .base import Task, TaskContext, TaskOutput, register_kind

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearParams:
    layer: str = "cls_last4"  # DINO ViT-S: concat of the last 4 blocks' final-norm CLS tokens
    epochs: int = 100  # DINO eval_linear.py
    batch_size: int = 1024  # DINO: 1024 total
    base_lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)  # per batch 256; DINO default 0.001, swept on held-out
    momentum: float = 0.9  # DINO eval_linear.py
    weight_decay: float = 0.0  # DINO eval_linear.py
    val_fraction: float = 0.1  # held-out part of train for choosing the lr (never the test set)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)
    max_train_samples: int = 0  # 0 = all; caps the train features used (for quick runs)


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, val): ``fraction`` of each class (at least one when the class has two or more) held out."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _rows(x: Any, idx: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a (possibly memory-mapped) feature matrix as float32 on ``device``; copies only the batch."""
    if isinstance(x, torch.Tensor):
        return x[idx].float().to(device)
    idx = np.sort(np.asarray(idx))
    return torch.from_numpy(np.asarray(x[idx], dtype=np.float32)).to(device)


def train_linear_head(features: Any, labels: np.ndarray, num_classes: int, *, lr: float, epochs: int,
                      batch_size: int, momentum: float, weight_decay: float, seed: int,
                      device: torch.device | str = "cpu") -> torch.nn.Linear:
    """Train a linear head on features [N, D] -> logits [N, C] with SGD + cosine schedule; returns it on CPU."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    d = int(features.shape[1])
    head = torch.nn.Linear(d, num_classes)
    with torch.no_grad():  # DINO LinearClassifier init
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    head = head.to(device)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y_all)
    bs = min(batch_size, n)
    steps_per_epoch = (n + bs - 1) // bs
    scaled = lr * bs / 256.0  # linear scaling rule (Goyal et al.), as DINO
    opt = torch.optim.SGD(head.parameters(), lr=scaled, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * steps_per_epoch, 1), eta_min=0)
    # Small banks live on the device whole; large ones are read batch by batch from the (memory-mapped) cache.
    whole = n * d * 4 <= 512 * 2**20
    x_dev = _rows(features, np.arange(n), device) if whole else None
    y_dev = y_all.to(device)
    for _ in range(epochs):
        for idx in _batches(n, bs, gen):
            xb = x_dev[idx.to(device)] if x_dev is not None else _rows(features, idx.numpy(), device)
            yb = y_dev[idx.to(device)] if x_dev is not None else y_all[np.sort(idx.numpy())].to(device)
            loss = F.cross_entropy(head(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.cpu().eval()


def predict_logits(head: torch.nn.Linear, features: Any, batch_size: int = 65536) -> np.ndarray:
    """Logits [N, C] of a linear head on features [N, D], in batches (works on memory-mapped banks)."""
    out = []
    with torch.no_grad():
        for s in range(0, int(features.shape[0]), batch_size):
            # np.array copies the batch: a read-only memmap view would make torch warn on every call
            out.append(head(torch.from_numpy(np.array(features[s : s + batch_size], dtype=np.float32))).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.out_features), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


@dataclass
class LinearHead:
    head: torch.nn.Linear
    layer: str
    lr: float
    val_top1: float
    num_classes: int

    def logits(self, features: Any) -> np.ndarray:
        return predict_logits(self.head, features)


def _head_key(train_key: str, params: LinearParams, seed: int, num_classes: int) -> str:
    blob = json.dumps({"train": train_key, "params": asdict(params), "seed": seed, "c": num_classes, "v": 1},
                      sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def fit_linear_probe(ctx: TaskContext, train_ref: Any, params: LinearParams, num_classes: int | None = None) -> LinearHead:
    """The linear head for (model, train set, params, seed): from the head cache, or trained with the lr chosen
    on a held-out part of the training split."""
    train = ctx.features(train_ref, params.layer)
    x, y = train.features, np.asarray(train.labels)
    if params.max_train_samples and len(y) > params.max_train_samples:
        keep = np.sort(ctx.rng(7).choice(len(y), params.max_train_samples, replace=False))
        x, y = x[keep], y[keep]
    c = num_classes or int(y.max()) + 1
    key = _head_key(train.key + f"|n={len(y)}", params, ctx.seed, c)
    path = inside(config.heads_dir(), key[:2], f"{key}.pt", what="probe head")
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            head = torch.nn.Linear(blob["weight"].shape[1], blob["weight"].shape[0])
            head.load_state_dict({"weight": blob["weight"], "bias": blob["bias"]}, strict=True)
            return LinearHead(head.eval(), params.layer, float(blob["lr"]), float(blob["val_top1"]), c)
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("ignoring unreadable head cache %s (%s)", path, exc)
    fit_idx, val_idx = _stratified_holdout(y, params.val_fraction, ctx.seed)
    x_fit, x_val = np.asarray(x[fit_idx], dtype=np.float32), np.asarray(x[val_idx], dtype=np.float32)
    best = (-1.0, np.inf, params.base_lrs[0])
    for lr in params.base_lrs:
        head = train_linear_head(x_fit, y[fit_idx], c, lr=lr, epochs=params.epochs, batch_size=params.batch_size,
                                 momentum=params.momentum, weight_decay=params.weight_decay, seed=ctx.seed,
                                 device=ctx.device)
        logits = predict_logits(head, x_val)
        top1 = float((logits.argmax(1) == y[val_idx]).mean()) if len(val_idx) else 0.0
        nll = float(F.cross_entropy(torch.as_tensor(logits), torch.as_tensor(y[val_idx])).item()) if len(val_idx) else 0.0
        if (top1, -nll) > (best[0], -best[1]):
            best = (top1, nll, lr)
    val_top1, _, lr = best
    head = train_linear_head(x, y, c, lr=lr, epochs=params.epochs, batch_size=params.batch_size,
                             momentum=params.momentum, weight_decay=params.weight_decay, seed=ctx.seed,
                             device=ctx.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save({"weight": head.weight.detach(), "bias": head.bias.detach(), "lr": lr, "val_top1": val_top1}, tmp)
    os.replace(tmp, path)
    return LinearHead(head, params.layer, lr, val_top1, c)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count of top-label predictions (for reliability diagrams)."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        m = which == b
        out["count"].append(int(m.sum()))
        out["confidence"].append(float(conf[m].mean()) if m.any() else float("nan"))
        out["accuracy"].append(float(correct[m].mean()) if m.any() else float("nan"))
    return out


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, prefix: str = "") -> dict[str, float]:
    from ..metrics import accuracy, expected_calibration_error, negative_log_likelihood

    out = {
        f"{prefix}top1": accuracy(probs, labels),
        f"{prefix}nll": negative_log_likelihood(probs, labels),
        f"{prefix}ece": expected_calibration_error(probs, labels, n_bins=n_bins),
    }
    if probs.shape[1] >= 5:
        out[f"{prefix}top5"] = accuracy(probs, labels, k=5)
    return out


#: Uncertainty-vs-error metrics of models with a predictive distribution (see the module docstring).
SIGMA_ERROR_METRICS = ("sigma_err_spearman", "sigma_misclf_auroc")


def sigma_error_metrics(uncertainty: np.ndarray, logits: np.ndarray,
                        labels: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
    """``sigma_err_spearman`` and ``sigma_misclf_auroc`` of a per-sample uncertainty [N] against a probe's logits
    [N, C] on labels [N]; returns (metrics, extras). An undefined metric is left out (logged), never NaN."""
    from scipy.special import logsumexp

    from ..metrics import MetricArgumentError, misclassification_auroc, spearman_uncertainty_error

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    nll = logsumexp(z, axis=1) - z[np.arange(len(y)), y]  # -log softmax(z)_y, without forming tiny probabilities
    correct = z.argmax(axis=1) == y
    out: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for name, fn, target in (("sigma_err_spearman", spearman_uncertainty_error, nll),
                             ("sigma_misclf_auroc", misclassification_auroc, correct)):
        try:
            out[name] = float(fn(uncertainty, target))
        except MetricArgumentError as exc:  # undefined for this run: absent rather than a made-up number
            skipped[name] = str(exc)
            log.warning("%s left out: %s", name, exc)
    about: dict[str, Any] = {"uncertainty": "mean predictive sigma", "error": "per-sample NLL of the true class",
                             "n": int(len(y)), "n_misclassified": int((~correct).sum()),
                             "sigma_mean": float(np.mean(uncertainty)) if len(y) else 0.0}
    if skipped:
        about["skipped"] = skipped
    return out, about


@register_kind("linear")
class LinearTask(Task):
    """Linear probe: ``top1``, ``top5`` (when C >= 5), ``nll``, ``ece`` on test; ``val_top1`` and ``lr`` chosen;
    ``sigma_err_spearman`` and ``sigma_misclf_auroc`` for models with a predictive distribution."""

    roles = ("train", "test")
    Params = LinearParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        if not params.base_lrs or any(lr <= 0 for lr in params.base_lrs):
            raise CardError(f"Card {spec.card!r}: protocol field 'base_lrs' must hold positive numbers")
        if not 0 < params.val_fraction < 1:
            raise CardError(f"Card {spec.card!r}: protocol field 'val_fraction' must be in (0, 1)")
        if params.epochs < 1 or params.batch_size < 1:
            raise CardError(f"Card {spec.card!r}: protocol fields 'epochs' and 'batch_size' must be >= 1")

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "val_top1", "lr", *SIGMA_ERROR_METRICS]

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        test = ctx.features(self.spec.datasets["test"], p.layer)
        train_labels = ctx.features(self.spec.datasets["train"], p.layer).labels
        c = int(max(np.max(train_labels), np.max(test.labels))) + 1
        head = fit_linear_probe(ctx, self.spec.datasets["train"], p, c)
        logits = head.logits(test.features)
        probs = softmax(logits)
        labels = np.asarray(test.labels)
        metrics = classification_metrics(probs, labels, p.n_bins)
        metrics["val_top1"] = head.val_top1
        metrics["lr"] = head.lr
        extras: dict[str, Any] = {"reliability": reliability_bins(probs, labels, p.n_bins)}
        if getattr(ctx.model, "has_predictive", False):
            sigma = ctx.features(self.spec.datasets["test"], "predictive_sigma")
            if not np.array_equal(np.asarray(sigma.labels), labels):
                raise FeatureError(f"{self.spec.name}: the predictive features of the test set are not in the order "
                                   "of its backbone features; clear the feature cache and run again")
            from .ood import mean_sigma

            found, about = sigma_error_metrics(mean_sigma(sigma.features), logits, labels)
            metrics.update(found)
            extras["sigma_vs_error"] = about
        return TaskOutput(metrics, extras)
