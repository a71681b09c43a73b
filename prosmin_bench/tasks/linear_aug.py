"""Linear probe trained on the fly on augmented images: DINO's ``eval_linear.py`` as run, not on cached features.

The ``linear`` kind trains on cached centre-crop features (fast, the default for sweeps); this kind is the exact
protocol, to measure what the shortcut costs. Protocol (facebookresearch/dino ``eval_linear.py``; docs/protocols.md
"Linear"):

- train images: ``RandomResizedCrop(crop)`` + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` (lines 85-90;
  torchvision objects, the crop size and mean / std of the model's preprocessing, the card's ``crop_scale``,
  ``hflip`` and ``interpolation``: DINO's ``RandomResizedCrop(224)`` uses torchvision's default, bilinear);
  every image's augmentation is drawn from its own seed (run seed, epoch, index), so a run gives the same
  augmented batches whatever the number of processes or data-loader workers;
- features: the frozen backbone (eval mode, no gradient: lines 164-167), the final-norm CLS tokens of the last
  ``n_last_blocks = 4`` blocks concatenated for ViT-S (``layer = "cls_last4"``; lines 165-166, 256-257);
- head: one linear layer, weights N(0, 0.01), zero bias (lines 243-244); SGD momentum 0.9, weight decay 0, lr x
  global batch / 256 (lines 103-108), ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped once per epoch
  (lines 109, 127), cross-entropy (line 175), 100 epochs (line 265), batch 1024 in total (128 per GPU, line 270, x 8
  GPUs, README.md line 263);
- evaluation: the model's own eval transform (Resize 256 + CenterCrop 224 at ImageNet scale, lines 65-70), i.e.
  the suite's cached centre-crop features (``ctx.features``), so evaluation is sharded and gathered under
  torchrun as every extraction is.

The views of the fit-part images are the same in every pass of a run (their seeds are), so later passes read the
backbone's features of those views from the first pass (``tasks/view_memo.py``, within the run's ``max_memory``;
``extras["augmentation"]["feature_memo"]``) instead of computing them again: the same batches and head updates.

Where it differs from DINO (the ImageNet card's ``deviations``): DINO reports the best test (val) accuracy over
epochs at an lr chosen by hand; here the lr is chosen on a stratified held-out ``val_fraction`` of train (never
test) by the suite's rule (``tasks/selection.py``: the grid ``base_lrs`` extended past an edge up to
``lr_bounds``), then a head is retrained on all of train at that lr for the fixed number of epochs and evaluated
once on test, as the ``linear`` kind does. One pass over the data trains a head per grid lr at once on the same
augmented batches (one backbone forward feeds every head; the heads are independent, so each equals a head trained
alone: DINOv2's ``dinov2/eval/linear.py`` does the same); an extension point of the grid costs one pass of its own.

``standardise`` (the mini card): the features are z-scored before the head with the mean and std of the training
rows' centre-crop features (``tasks/probes.py`` ``feature_stats``, as the ``linear`` kind's mini card), folded into
the head afterwards; the same fixed statistics for every augmented batch, so the two probes see features on the same
scale. The mini card's schedule is shorter than ``digits_linear``'s (4 epochs at batch 32, 164 steps, against 100
epochs at batch 256, about 600 steps: a backbone forward per augmented image costs ~2 ms on one core), so its gap to
``digits_linear`` is the augmentation plus the shorter schedule: measured for random_micro (seed 0), crops off at
6 epochs reached 0.73 held-out top-1 against digits_linear's 0.86, i.e. about 0.13 of its 0.36 gap is the schedule.

Metrics as the ``linear`` kind: ``top1``, ``top5`` (C >= 5), ``nll``, ``ece``, ``val_top1``, ``lr``; ``nll_ts``,
``ece_ts`` and ``temperature`` of the head trained on the fit part at the chosen lr, T fitted on its held-out logits
(Guo et al. 2017; ``tasks/scaling.py``). Under torchrun every rank trains on its ``DistributedSampler`` shard
(``set_epoch`` each epoch, as lines 92 and 124) with the heads in DDP; rank 0 leads the others into each training
pass with :data:`SERVE_MESSAGE`, which the runner's followers hand to :func:`serve`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from .. import distributed, progress
from ..errors import CardError, DataError
from ..metrics import fit_temperature, temperature_scale
from ..settings import PRECISIONS
from .base import BackboneFace, Task, TaskContext, TaskOutput, classification_samples, register_kind
from .probes import classification_metrics, feature_stats, predict_logits, reliability_extras, softmax, \
    stratified_holdout
from .scaling import temperature_metrics
from .selection import Score, check_bounds, logits_score, select_on_grid
from .view_memo import MarkedBatches, ViewMemo, collate_marked, view_features

log = logging.getLogger(__name__)

#: The message rank 0 sends (``distributed.lead``) before each training pass; followers pass it to :func:`serve`.
SERVE_MESSAGE = "linear_aug_train"
_INTERPOLATIONS = [m.value for m in T.InterpolationMode]


@dataclass(frozen=True)
class LinearAugParams:
    layer: str = "cls_last4"  # DINO eval_linear.py n_last_blocks = 4 (ViT-S), lines 256-257
    epochs: int = 100  # DINO eval_linear.py line 265
    batch_size: int = 1024  # total over processes: DINO 128 per GPU (line 270) x 8 GPUs (README.md line 263)
    base_lrs: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1)  # per batch 256; DINO default 0.001 (line 266)
    lr_bounds: tuple[float, float] = (1e-5, 100.0)  # grid extension bounds, as the linear kind (tasks/probes.py)
    momentum: float = 0.9  # DINO eval_linear.py line 106
    weight_decay: float = 0.0  # DINO eval_linear.py line 107
    val_fraction: float = 0.1  # held-out part of train for choosing the lr (never the test set)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's default scale (DINO line 86)
    hflip: bool = True  # DINO eval_linear.py line 87
    interpolation: str = "bilinear"  # RandomResizedCrop's default (DINO line 86 passes none)
    standardise: bool = False  # z-score with the train rows' centre-crop statistics (module docstring)
    n_bins: int = 15  # ECE bins (Guo et al. 2017)


def check_linear_aug_params(spec: Any, p: LinearAugParams) -> None:
    bad = []
    if not p.base_lrs or any(not isinstance(v, (int, float)) or v <= 0 for v in p.base_lrs):
        bad.append("'base_lrs' must hold positive numbers")
    if p.epochs < 1 or p.batch_size < 1 or p.n_bins < 1:
        bad.append("'epochs', 'batch_size' and 'n_bins' must be >= 1")
    if not 0 < p.val_fraction < 1:
        bad.append("'val_fraction' must be in (0, 1)")
    if p.momentum < 0 or p.weight_decay < 0:
        bad.append("'momentum' and 'weight_decay' must be >= 0")
    if len(p.crop_scale) != 2 or not 0 < p.crop_scale[0] <= p.crop_scale[1] <= 1:
        bad.append(f"'crop_scale' must be [lo, hi] with 0 < lo <= hi <= 1, got {list(p.crop_scale)}")
    for name in ("hflip", "standardise"):
        if not isinstance(getattr(p, name), bool):
            bad.append(f"'{name}' must be true or false, got {getattr(p, name)!r}")
    if p.interpolation not in _INTERPOLATIONS:
        bad.append(f"'interpolation' must be one of {_INTERPOLATIONS}, got {p.interpolation!r}")
    if bad:
        raise CardError(f"Card {spec.card!r}: protocol field(s) {'; '.join(bad)}")
    check_bounds(spec.card, "base_lrs", p.base_lrs, "lr_bounds", p.lr_bounds)


def train_transform(model: BackboneFace, p: LinearAugParams) -> T.Compose:
    """DINO's train transform (module docstring) at the model's crop size and normalisation."""
    pre = model.spec.preprocess
    ops: list[Any] = [T.RandomResizedCrop(pre.crop, scale=tuple(p.crop_scale),
                                          interpolation=T.InterpolationMode(p.interpolation))]
    if p.hflip:
        ops.append(T.RandomHorizontalFlip())
    ops += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(ops)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of image ``index``'s augmentation in ``epoch`` of a run with ``seed``."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededAugmented(torch.utils.data.Dataset):
    """Items ``indices`` of an image dataset through ``transform``, each drawn from the global torch RNG seeded with
    :func:`item_seed` (set :attr:`epoch` before each epoch); the caller's RNG state is left as it was.

    Item ``i``: (view, label). Item ``(i, known)`` (``view_memo.MarkedBatches``): (view, label, index), the view
    None when ``known`` (its features are memoised: nothing is loaded)."""

    def __init__(self, dataset: Any, indices: np.ndarray, transform: Any, seed: int) -> None:
        self.dataset = dataset.with_transform(None)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[Any, ...]:
        if isinstance(key, tuple):
            index = int(self.indices[key[0]])
            if key[1]:
                return None, int(self.dataset.labels[index]), index
            return (*self[key[0]], index)
        index = int(self.indices[key])
        image, label = self.dataset[index]
        gen = torch.default_generator  # what torchvision's transforms draw from (torch.manual_seed seeds it too)
        state = gen.get_state()  # torch.random.fork_rng would cost 0.5 ms an image (it also forks accelerators)
        try:
            gen.manual_seed(item_seed(self.seed, self.epoch, index))
            return self.transform(image), label
        finally:
            gen.set_state(state)


class Heads(nn.Module):
    """One linear head per learning rate on the same features: features [N, D] -> logits [H, N, C]."""

    def __init__(self, dim: int, num_classes: int, n_heads: int, seed: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n_heads))
        for head in self.heads:  # DINO LinearClassifier init (eval_linear.py lines 243-244), the same for each head
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                head.weight.normal_(0.0, 0.01, generator=gen)
                head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads])


def train_heads(model: BackboneFace, dataset: Any, indices: np.ndarray, lrs: list[float], num_classes: int,
                p: LinearAugParams, *, seed: int, device: torch.device, stats: tuple[torch.Tensor, torch.Tensor] | None,
                num_workers: int = 0, precision: str = "fp32", desc: str = "linear_aug", memo: ViewMemo | None = None,
                keep: bool = True) -> dict[float, nn.Linear]:
    """A head per lr in ``lrs`` trained on images ``indices`` of ``dataset`` (DINO's loop, module docstring), on CPU
    and in eval mode; ``stats`` = (mean, std) [D] z-score the features and are folded into the returned heads.
    ``memo``: the run's backbone features of earlier passes' views, read where they exist and, with ``keep``,
    extended by this pass's (``tasks/view_memo.py``); the heads are the same without it.

    A collective under torchrun: every rank calls it with the same arguments and gets the same heads."""
    world = distributed.world_size()
    items = SeededAugmented(dataset, indices, train_transform(model, p), seed)
    # DINO's DistributedSampler (eval_linear.py line 92): shuffled per epoch from the seed, padded to equal shards
    sampler = distributed.distributed_sampler(items, seed=seed, shuffle=True, drop_last=False)
    per_rank = max(min(p.batch_size, len(items)) // world, 1)
    batches = MarkedBatches(sampler, per_rank, items.indices, memo)
    loader = torch.utils.data.DataLoader(items, batch_sampler=batches, collate_fn=collate_marked,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    if memo is not None:
        memo.bind((seed, p.layer, precision, tuple(p.crop_scale), p.hflip, p.interpolation, id(model), len(dataset)))
    heads = Heads(model.layer_dim(p.layer), num_classes, len(lrs), seed).to(device)
    scale = per_rank * world / 256.0  # linear scaling rule on the global batch (DINO eval_linear.py line 105)
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": lr * scale} for h, lr in zip(heads.heads, lrs)],
                          lr=lrs[0] * scale, momentum=p.momentum, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p.epochs, eta_min=0)  # per epoch, DINO line 109
    net = distributed.wrap_ddp(heads, device)
    mean, std = (None, None) if stats is None else (stats[0].to(device), stats[1].to(device))
    amp = PRECISIONS[precision]

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            return model.features(images.to(device, non_blocking=True), p.layer)

    for epoch in progress.bar(range(p.epochs), desc=desc, unit="epoch"):  # rank 0's only (progress.py)
        sampler.set_epoch(epoch)  # DINO line 124
        items.epoch = batches.epoch = epoch
        for images, y, index, known in loader:
            x = view_features(forward, images, index, known, memo, epoch, keep=keep, capacity=len(sampler),
                              n_index=len(dataset)).float()
            if mean is not None:
                x = (x - mean) / std
            logits = net(x)  # [H, n, C]
            y = y.to(device)
            # the heads are independent: the gradient of the summed losses is each head's own
            loss = sum(F.cross_entropy(logits[h], y) for h in range(len(lrs)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    out = {}
    for lr, head in zip(lrs, heads.heads):
        head = head.cpu().eval()
        if stats is not None:  # fold: W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)
            with torch.no_grad():
                w = head.weight.double() / stats[1].double()
                head.bias.copy_((head.bias.double() - w @ stats[0].double()).float())
                head.weight.copy_(w.float())
        out[float(lr)] = head
    return out


#: A follower's view memo between the passes of one run: {rank 0's memo token: this process's memo}.
_FOLLOWER_MEMO: dict[str, ViewMemo] = {}


def serve(source: Any, message: Any) -> None:
    """A follower's part of one training pass rank 0 leads with ``(SERVE_MESSAGE, payload)`` (``source``: the
    follower's feature source for the same model). The follower keeps its own view memo from pass to pass of a run
    (payload ``memo``: rank 0's token, and whether this is the run's last pass, after which it is dropped)."""
    payload = message[1]
    p = LinearAugParams(**payload["params"])
    token, last = payload["memo"]["token"], payload["memo"]["last"]
    if token not in _FOLLOWER_MEMO:  # a new run: the previous run's memo (if it ended early) goes
        _FOLLOWER_MEMO.clear()
        _FOLLOWER_MEMO[token] = ViewMemo(source.settings.max_memory)
    try:
        train_heads(source.model, source.dataset(payload["train_ref"]), payload["indices"], payload["lrs"],
                    payload["num_classes"], p, seed=payload["seed"], device=source.settings.device,
                    stats=payload["stats"], num_workers=source.settings.num_workers,
                    precision=source.settings.precision, memo=_FOLLOWER_MEMO[token], keep=not last)
    finally:
        if last:
            _FOLLOWER_MEMO.clear()


@register_kind("linear_aug")
class LinearAugTask(Task):
    """Linear probe on augmented images: ``top1``, ``top5`` (C >= 5), ``nll``, ``ece``, ``nll_ts``, ``ece_ts``,
    ``temperature``, ``val_top1``, ``lr`` (``extras["selection"]["lr"]``, ``extras["augmentation"]``)."""

    roles = ("train", "test")
    Params = LinearAugParams

    @classmethod
    def check_params(cls, spec, params) -> None:
        check_linear_aug_params(spec, params)

    def metric_names(self) -> list[str]:
        return ["top1", "top5", "nll", "ece", "nll_ts", "ece_ts", "temperature", "val_top1", "lr"]

    def _pass(self, ctx: TaskContext, indices: np.ndarray, lrs: list[float], c: int, ref_features: Any,
              what: str, memo: ViewMemo, last: bool = False) -> dict[float, nn.Linear]:
        p = self.params
        stats = feature_stats(np.asarray(ref_features[indices], dtype=np.float32)) if p.standardise else None
        if distributed.world_size() > 1:
            distributed.lead((SERVE_MESSAGE, {"train_ref": self.spec.refs["train"], "indices": indices, "lrs": lrs,
                                              "num_classes": c, "params": asdict(p), "seed": ctx.seed,
                                              "stats": stats, "memo": {"token": memo.token, "last": last}}))
        log.info("%s: training %d head(s) (lr %s) on %d %s images for %d epochs", self.spec.name, len(lrs),
                 ", ".join(f"{v:g}" for v in lrs), len(indices), what, p.epochs)
        return train_heads(ctx.model, ctx.dataset(self.spec.refs["train"]), indices, lrs, c, p, seed=ctx.seed,
                           device=ctx.device, stats=stats, num_workers=ctx.settings.num_workers,
                           precision=ctx.settings.precision, memo=memo, keep=not last,
                           desc=f"{len(lrs)} head(s) on the {what} images (seed {ctx.seed})")

    def run(self, ctx: TaskContext) -> TaskOutput:
        p = self.params
        train_ref, test_ref = self.spec.refs["train"], self.spec.refs["test"]
        ref = ctx.features(train_ref, p.layer)  # centre-crop (eval) features: held-out logits, standardisation
        test = ctx.features(test_ref, p.layer)
        y = np.asarray(ctx.dataset(train_ref).labels)
        if not np.array_equal(np.asarray(ref.labels), y):
            raise DataError(f"{self.spec.name}: the cached features of {train_ref.raw!r} are not in the order of its "
                            "images; clear the feature cache and run again")
        labels = np.asarray(test.labels)
        c = int(max(y.max(), labels.max())) + 1
        fit_idx, val_idx = stratified_holdout(y, p.val_fraction, ctx.seed)
        x_val, y_val = np.asarray(ref.features[val_idx], dtype=np.float32), y[val_idx]
        memo = ViewMemo(ctx.settings.max_memory)  # the fit-part views' features, for the later passes
        trained = self._pass(ctx, fit_idx, list(dict.fromkeys(float(v) for v in p.base_lrs)), c, ref.features,
                             "fit-part", memo)
        best: dict[str, Any] = {"key": None}

        def evaluate(lr: float) -> Score:
            if lr not in trained:  # a grid extension point: one more pass, for it alone
                trained.update(self._pass(ctx, fit_idx, [lr], c, ref.features, "fit-part", memo))
            logits = predict_logits(trained[lr], x_val).astype(np.float64)
            score = logits_score(logits, y_val)
            if best["key"] is None or score.key > best["key"]:  # select_on_grid's rule: the first best wins
                best.update(key=score.key, logits=logits, lr=lr)
            return score

        sel = select_on_grid(p.base_lrs, evaluate, p.lr_bounds)
        lr = sel.chosen
        head = self._pass(ctx, np.arange(len(y)), [lr], c, ref.features, "train", memo, last=True)[lr]
        memo.release()
        probs = softmax(predict_logits(head, test.features))
        metrics = classification_metrics(probs, labels, p.n_bins)
        metrics.update(val_top1=sel.scores[lr].top1, lr=lr)
        if len(val_idx):  # Guo et al.: the fit-part head, T fitted on the held-out split, evaluated on test
            t = fit_temperature(best["logits"], y_val)
            calib = predict_logits(trained[best["lr"]], test.features)
            metrics.update(temperature_metrics(temperature_scale(calib, t), labels, t, p.n_bins))
        else:
            log.warning("%s: nothing held out to fit a temperature on; nll_ts / ece_ts left out", self.spec.name)
        tf = train_transform(ctx.model, p)
        extras: dict[str, Any] = {
            "augmentation": {"train_transform": [repr(op) for op in tf.transforms],
                             "eval_transform": [repr(op) for op in getattr(ctx.model.transform, "transforms", [])],
                             "crop_scale": [float(v) for v in p.crop_scale], "hflip": p.hflip,
                             "interpolation": p.interpolation, "per_image_seed": "(seed, epoch, index)",
                             "n_train": int(len(y)), "n_fit": int(len(fit_idx)), "n_held_out": int(len(val_idx)),
                             "feature_memo": memo.as_extras()},  # rank 0's under torchrun
            "reliability": reliability_extras(probs, labels, p.n_bins),
            "selection": {"lr": sel.as_extras()},
            "val_scores": sel.score_table(),
        }
        return TaskOutput(metrics, extras, classification_samples(self.spec.main_score, probs, labels))
