"""What the probe kinds share: the held-out split, the cached linear head (trained here, reused by the OOD and
corruption tasks through ``head_task``), the labelled subset and classification metrics (sigma: ``tasks/sigma.py``).

The linear head (DINO ``eval_linear.py``, docs/protocols.md "Linear"): one linear layer, weights N(0, 0.01), zero bias;
SGD with momentum, cosine schedule, lr scaled by batch / 256, on the features as extracted (as DINO). With the
protocol field ``standardise`` (the mini cards set it) features are first z-scored with the training rows' mean and
std, as MAE's probe does (facebookresearch/mae ``main_linprobe.py``: ``BatchNorm1d(affine=False, eps=1e-6)`` before
the head); the statistics are folded into the layer, so the head takes raw features wherever it is used. The micro
models need it: their tokens share a large common component (unstandardised, the open-set head reached 40-73%).
The lr is chosen on a stratified held-out part of the training split (never the test set) by ``tasks/selection.py``:
the card's grid ``base_lrs`` (its heads trained in one batched call, each exactly as if alone:
``tasks/probe_heads.py``), extended log-spaced past an edge choice up to ``lr_bounds``. The head is then retrained
on the whole split at the chosen lr and cached by content (the train features' key and count, every param, the seed,
the class count and the class subset), together with what the record needs (the chosen lr, the held-out top-1, every
lr evaluated with its held-out scores, the temperature), so a cached head gives the same record as a fresh one.

The temperature (``tasks/scaling.py``) is fitted on the held-out split's logits of the head trained on the fit part
at the chosen lr, and nll_ts / ece_ts are that head's test logits / T (the cache keeps it too).

A task names another task's head with the protocol field ``head_task`` (e.g. ``"digits_linear"``):
:func:`shared_linear_head` gives the head that task trains, with its train set, params, seed and class count rule,
so it is trained exactly once. ``fit_linear_probe(..., classes=[...])`` trains a head on a subset of the classes
(the open-set OOD protocol: a head on the in-distribution classes only).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .. import config, progress
from ..atomic import atomic_path
from ..data.base import DatasetRef
from ..data.subsets import LabelledSubset, resolve_split_file, stratified_subset, subset_from_split_file
from ..errors import CardError, DataError
from ..metrics import (
    accuracy,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
)
from ..paths import inside
from .base import TASK_KINDS, TaskContext, TaskSpec, get_task_spec
from .probe_heads import (  # noqa: F401  (feature_stats, train_linear_head: importable from here as before)
    feature_stats,
    train_linear_head,
    train_linear_heads,
)
from .selection import Score, logits_score, select_on_grid

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
    # Hard bounds of the lr grid's extension (tasks/selection.py). Low: the smallest lr of DINOv2's linear sweep
    # (facebookresearch/dinov2, dinov2/eval/linear.py, learning_rates defaults 1e-5 .. 0.1). High: softmax
    # cross-entropy has curvature at most lambda_max(E[x x^T]) / 2 in the head's weights, and SGD with momentum 0.9
    # is stable below 2 (1 + 0.9) / curvature: that bound guarantees lr 100 (x batch / 256) only for features with
    # lambda_max(E[x x^T]) < 0.076 (unit-variance features have it >= 1); a probe that wants more is flagged (edge).
    lr_bounds: tuple[float, float] = (1e-5, 100.0)
    standardise: bool = False  # z-score features with the training rows' statistics, as MAE (module docstring)


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
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
    """A trained head with its lr selection: ``selection`` is ``Selection.as_extras()`` (grid, chosen, edge),
    ``val_scores`` maps each lr evaluated (``f"{lr:g}"``) to its held-out ``top1`` and ``nll``; ``temperature`` is
    None when nothing was held out."""

    head: torch.nn.Linear
    layer: str
    lr: float
    val_top1: float
    num_classes: int
    temperature: float | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    val_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the head trained on the fit part at the chosen lr: the model ``temperature`` was fitted for (nll_ts, ece_ts)
    calibration_head: torch.nn.Linear | None = None

    def logits(self, features: Any) -> np.ndarray:
        return predict_logits(self.head, features)


def _head_key(train_key: str, params: LinearParams, seed: int, num_classes: int,
              classes: Sequence[int] | None) -> str:
    # v3: lr grid extension (lr_bounds), the temperature, the selection and the fit-part head stored, class subsets
    blob = json.dumps({"train": train_key, "params": asdict(params), "seed": seed, "c": num_classes,
                       "classes": None if classes is None else list(classes), "v": 3}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_head(path: Any, layer: str, c: int) -> LinearHead | None:
    """The cached head at ``path`` with what the record needs, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        head = torch.nn.Linear(blob["weight"].shape[1], blob["weight"].shape[0])
        head.load_state_dict({"weight": blob["weight"], "bias": blob["bias"]}, strict=True)
        t = blob["temperature"]
        calib = None
        if blob["calibration_weight"] is not None:
            calib = torch.nn.Linear(blob["calibration_weight"].shape[1], blob["calibration_weight"].shape[0])
            calib.load_state_dict({"weight": blob["calibration_weight"], "bias": blob["calibration_bias"]}, strict=True)
            calib.eval()
        return LinearHead(head.eval(), layer, float(blob["lr"]), float(blob["val_top1"]), c,
                          None if t is None else float(t), dict(blob["selection"]), dict(blob["val_scores"]), calib)
    except Exception as exc:  # a damaged cache entry is recomputed, never trusted
        log.warning("ignoring unreadable head cache %s (%s)", path, exc)
        return None


def _class_subset(x: Any, y: np.ndarray, classes: Sequence[int], train_ref: DatasetRef) -> tuple[Any, np.ndarray]:
    """Rows of the training set whose label is in ``classes``, labels remapped to 0..len(classes)-1 in that order."""
    wanted = np.asarray(classes, dtype=np.int64)
    if wanted.ndim != 1 or len(wanted) == 0 or len(set(wanted.tolist())) != len(wanted) or wanted.min() < 0:
        raise DataError(f"Expected `classes` to be distinct non-negative class indices, but got {list(classes)}")
    absent = sorted(set(wanted.tolist()) - set(np.unique(y).tolist()))
    if absent:
        raise DataError(f"Classes {absent} have no training image in {train_ref.raw!r}; choose classes it has")
    keep = np.flatnonzero(np.isin(y, wanted))
    remap = np.full(int(max(y.max(), wanted.max())) + 1, -1, dtype=np.int64)
    remap[wanted] = np.arange(len(wanted))
    return x[keep], remap[y[keep]]


def fit_linear_probe(ctx: TaskContext, train_ref: DatasetRef, params: LinearParams, num_classes: int | None = None,
                     *, classes: Sequence[int] | None = None) -> LinearHead:
    """The linear head for (model, train set, params, seed[, classes]): from the head cache, or trained at the lr
    chosen on a held-out part of the training split (module docstring; ``tasks/selection.py``).

    ``classes``: only training images of these classes are used, labelled 0..len(classes)-1 in the given order;
    the head has len(classes) outputs (``num_classes`` is then ignored). ``max_train_samples`` caps the images
    after this filter.
    """
    train = ctx.features(train_ref, params.layer)
    x, y = train.features, np.asarray(train.labels)
    if classes is not None:
        classes = [int(v) for v in classes]
        x, y = _class_subset(x, y, classes, train_ref)
    if params.max_train_samples and len(y) > params.max_train_samples:
        keep = np.sort(ctx.rng(7).choice(len(y), params.max_train_samples, replace=False))
        x, y = x[keep], y[keep]
    c = len(classes) if classes is not None else (num_classes or int(y.max()) + 1)
    key = _head_key(train.key + f"|n={len(y)}", params, ctx.seed, c, classes)
    path = inside(config.heads_dir(), key[:2], f"{key}.pt", what="probe head")
    cached = _load_head(path, params.layer, c)
    if cached is not None:
        return cached
    fit_idx, val_idx = stratified_holdout(y, params.val_fraction, ctx.seed)
    x_fit, x_val = np.asarray(x[fit_idx], dtype=np.float32), np.asarray(x[val_idx], dtype=np.float32)
    y_val = y[val_idx]
    best: dict[str, Any] = {"key": None, "logits": None}
    train_kw: dict[str, Any] = dict(epochs=params.epochs, batch_size=params.batch_size, momentum=params.momentum,
                                    weight_decay=params.weight_decay, seed=ctx.seed, device=ctx.device,
                                    standardise=params.standardise)
    grid = list(dict.fromkeys(float(v) for v in params.base_lrs))
    trained: dict[float, torch.nn.Linear] = {}
    # One step per head trained: the grid's (together), each extension point's, the final head's.
    bar = progress.bar(desc=f"linear probe lr sweep on {train_ref.raw} (seed {ctx.seed})", total=len(grid) + 1,
                       unit="head")

    def evaluate(lr: float) -> Score:
        # First call (select_on_grid has checked the grid): the card's whole grid in one batched call, each head as
        # if trained alone (tasks/probe_heads.py); the extension points past an edge are trained as they are asked.
        if grid:
            trained.update(zip(grid, train_linear_heads(x_fit, y[fit_idx], c, lrs=grid, **train_kw)))
            bar.update(len(grid))
            grid.clear()
        if lr in trained:
            head = trained.pop(lr)
        else:
            bar.total += 1
            head = train_linear_head(x_fit, y[fit_idx], c, lr=lr, **train_kw)
            bar.update(1)
        logits = predict_logits(head, x_val).astype(np.float64)
        score = logits_score(logits, y_val)
        log.debug("linear probe lr %g: held-out top1 %.4f nll %.4f", lr, score.top1, score.nll)
        if best["key"] is None or score.key > best["key"]:  # the rule of select_on_grid: the first best wins
            best.update(key=score.key, logits=logits, head=head)
        return score

    with bar:
        sel = select_on_grid(params.base_lrs, evaluate, params.lr_bounds)
        lr = sel.chosen
        temperature = fit_temperature(best["logits"], y_val) if len(val_idx) else None
        head = train_linear_head(x, y, c, lr=lr, **train_kw)
        bar.update(1)
    val_top1 = sel.scores[lr].top1
    val_scores = sel.score_table()
    calib = best["head"] if len(val_idx) else None
    out = LinearHead(head, params.layer, lr, val_top1, c, temperature, sel.as_extras(), val_scores, calib)
    with atomic_path(path) as tmp:
        torch.save({"weight": head.weight.detach(), "bias": head.bias.detach(), "lr": lr, "val_top1": val_top1,
                    "temperature": temperature, "selection": out.selection, "val_scores": val_scores,
                    "calibration_weight": None if calib is None else calib.weight.detach(),
                    "calibration_bias": None if calib is None else calib.bias.detach()}, tmp)
    return out


@dataclass
class SharedHead:
    """A linear task's head and what it was trained with."""

    head: LinearHead
    task: TaskSpec
    params: LinearParams
    num_classes: int

    @property
    def layer(self) -> str:
        return self.params.layer


def linear_task_spec(name: str, card: str) -> tuple[TaskSpec, LinearParams]:
    """The ``linear`` task ``name`` and its parsed params; CardError (naming ``card``) if it is another kind."""
    spec = get_task_spec(name)
    if spec.kind != "linear":
        raise CardError(
            f"Card {card!r}: protocol field 'head_task' must name a task of kind 'linear', but {name!r} is "
            f"{spec.kind!r}"
        )
    return spec, TASK_KINDS.get("linear").parse_params(spec)


def shared_linear_head(ctx: TaskContext, head_task: str, *, card: str, train_ref: DatasetRef | None = None,
                       test_ref: DatasetRef | None = None) -> SharedHead:
    """The head of linear task ``head_task`` for this model and seed.

    ``train_ref`` / ``test_ref``, when given (the calling card's own ``train`` / ``test``), must equal the linear
    task's: a head trained on another set would make the numbers mean something else.
    """
    spec, params = linear_task_spec(head_task, card)
    for role, ref in (("train", train_ref), ("test", test_ref)):
        if ref is not None and ref != spec.refs[role]:
            raise CardError(
                f"Card {card!r}: datasets.{role} is {ref.raw!r}, but its head_task {head_task!r} uses "
                f"{spec.datasets[role]!r}; they must be the same set"
            )
    train_labels = np.asarray(ctx.features(spec.refs["train"], params.layer).labels)
    test_labels = np.asarray(ctx.features(spec.refs["test"], params.layer).labels)
    # The class count rule of LinearTask.run, so the head (cached by class count) is the very same one.
    c = int(max(train_labels.max(), test_labels.max())) + 1
    head = fit_linear_probe(ctx, spec.refs["train"], params, c)
    return SharedHead(head, spec, params, c)


def labelled_subset(ctx: TaskContext, train_ref: DatasetRef, labels: np.ndarray, subset_file: str, fraction: float,
                    card: str) -> LabelledSubset:
    """The labelled subset of the training set: from a SimCLR split file, else stratified with the seed."""
    if subset_file:
        ds = ctx.dataset(train_ref)
        if not hasattr(ds, "paths"):
            raise DataError(
                f"Card {card!r}: subset_file needs a train set read from image files (e.g. imagenet:train), but "
                f"{train_ref.raw!r} is not; use `fraction` instead"
            )
        return subset_from_split_file(ds.paths, np.asarray(ds.labels), ds.class_names,
                                      resolve_split_file(subset_file, ctx.data_root), root=getattr(ds, "root", None))
    return stratified_subset(labels, fraction, ctx.seed)


def check_subset_params(spec: Any, subset_file: str, fraction: float) -> None:
    if bool(subset_file) == (fraction > 0):
        raise CardError(f"Card {spec.card!r}: set exactly one of protocol fields 'subset_file' and 'fraction'")
    if fraction and not 0 < fraction < 1:
        raise CardError(f"Card {spec.card!r}: protocol field 'fraction' must be in (0, 1), got {fraction}")


def reliability_extras(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """The record's ``reliability`` extras: the bins of the ECE it records (``metrics.reliability_bins``, the same
    edges), as JSON lists of per-bin mean confidence, accuracy (NaN when empty) and count."""
    bins = reliability_bins(probs, labels, n_bins)
    return {"confidence": [float(c) for c in bins["confidence"]], "accuracy": [float(a) for a in bins["accuracy"]],
            "count": [int(n) for n in bins["count"]]}


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, prefix: str = "") -> dict[str, float]:
    out = {
        f"{prefix}top1": accuracy(probs, labels),
        f"{prefix}nll": negative_log_likelihood(probs, labels),
        f"{prefix}ece": expected_calibration_error(probs, labels, n_bins=n_bins),
    }
    if probs.shape[1] >= 5:
        out[f"{prefix}top5"] = accuracy(probs, labels, k=5)
    return out
