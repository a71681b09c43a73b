"""Training linear probe heads: several learning rates at once, each head exactly as if trained alone.

The linear probe's lr search (``tasks/probes.py``, ``tasks/selection.py``) trains one head per grid lr on the same
cached features. On small problems (the mini cards: ~1,300 rows of 384 features, 10 classes) each step is a tiny
matmul, so the time goes to per-step overhead (autograd graph, optimiser and scheduler objects, batch gathering).
:func:`train_linear_heads` trains the heads of all lrs in one loop: per step one batch gather, one cross-entropy
over every head's logits, the matmuls of each head and a plain-tensor SGD update (issue 20: the grid of 5 lrs on
``random_sincos_micro``'s digits features, 2.6 s -> 0.9 s of CPU). One [B, L*C] matmul for all heads instead of L
[B, C] ones was no faster at these sizes, and its floats differ from a head trained alone.

Each head stays independent and equal to a head trained alone at its lr with ``nn.Linear``, ``torch.optim.SGD``
and ``CosineAnnealingLR`` (the single-head loop used before issue 20, kept as the tests' reference):

- the same init and batch order: one ``torch.Generator`` seeded with ``seed`` draws the init N(0, 0.01) [C, D]
  (DINO ``eval_linear.py`` LinearClassifier; zero bias), copied to every head, then each epoch's permutation;
- the loss is the sum over heads of each head's mean cross-entropy, so each head's gradient is its own;
- SGD with momentum and weight decay per head with its own lr, step for step as ``torch.optim.SGD`` (torch
  ``optim/sgd.py`` ``_single_tensor_sgd``: d = g + wd w; buf = d on the first step, else m buf + d; w -= lr_t buf),
  lr_t from ``CosineAnnealingLR(T_max = epochs x steps per epoch, eta_min = 0)`` (torch ``optim/lr_scheduler.py``
  ``CosineAnnealingLR.get_lr``: its recursive form, which :func:`cosine_lrs` reproduces float for float).

Each head's matmuls have the shapes and operand order of ``nn.Linear``'s forward and backward, the cross-entropy is
computed row by row, and the update is SGD's own tensor ops, so on CPU the heads equal separately trained ones to
the last bit here (tests/test_probe_heads.py checks them to float tolerance, which is what any BLAS guarantees).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Feature banks up to this size (float32 bytes) are copied to the device whole; larger ones are read per batch.
WHOLE_BANK_BYTES = 512 * 2**20


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _rows(x: Any, idx: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows of a (possibly memory-mapped) feature matrix as float32 on ``device``; copies only the batch."""
    if isinstance(x, torch.Tensor):
        return x[idx].float().to(device)
    idx = np.sort(np.asarray(idx))
    return torch.from_numpy(np.asarray(x[idx], dtype=np.float32)).to(device)


def feature_stats(x: Any, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std [D] of features [N, D] (memory-mapped too), in float64 chunks; std 1 if constant."""
    n, d = int(x.shape[0]), int(x.shape[1])
    total, total_sq = np.zeros(d), np.zeros(d)
    for s in range(0, n, chunk):
        part = np.asarray(x[s : s + chunk], dtype=np.float64)
        total += part.sum(axis=0)
        total_sq += (part * part).sum(axis=0)
    mean = total / max(n, 1)
    var = np.maximum(total_sq / max(n, 1) - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 1e-6 * max(float(std.max(initial=0.0)), 1e-12), std, 1.0)  # constant dims map to 0
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def cosine_lrs(lr: float, total_steps: int) -> list[float]:
    """The lr of each of ``total_steps`` steps under ``CosineAnnealingLR(T_max=total_steps, eta_min=0)`` stepped
    once per step: torch's recursive form (lr_t = (1 + cos(pi t / T)) / (1 + cos(pi (t - 1) / T)) lr_{t-1}), not
    the closed form, whose floats differ in the last bits."""
    out, current = [], float(lr)
    for t in range(total_steps):
        if t:
            current = (1 + math.cos(math.pi * t / total_steps)) / (1 + math.cos(math.pi * (t - 1) / total_steps)) \
                * current
        out.append(current)
    return out


def train_linear_heads(features: Any, labels: np.ndarray, num_classes: int, *, lrs: Sequence[float], epochs: int,
                       batch_size: int, momentum: float, weight_decay: float, seed: int,
                       device: torch.device | str = "cpu", standardise: bool = False) -> list[torch.nn.Linear]:
    """One linear head per lr in ``lrs`` (in that order), each as :func:`train_linear_head` trains it alone (module
    docstring); features [N, D] -> logits [N, C], heads on CPU.

    ``standardise``: train on (x - m) / s with the rows' per-dimension mean m and std s [D], then fold them into the
    returned layers, which therefore take raw features."""
    lrs = [float(v) for v in lrs]
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise ValueError(f"Expected `lrs` to be one or more positive finite learning rates, but got {lrs}")
    device = torch.device(device)
    n_heads, d, c = len(lrs), int(features.shape[1]), int(num_classes)
    mean, std = feature_stats(features) if standardise else (None, None)
    gen = torch.Generator().manual_seed(seed)
    init = torch.empty(c, d).normal_(0.0, 0.01, generator=gen)  # DINO LinearClassifier init, the same for every lr
    # One tensor per head (not views of one [L, C, D] block): every matmul then has the single-head loop's shapes
    # and memory alignment, which is what makes BLAS results bit-identical to it (a wider [B, L*C] product is not).
    weights = [init.clone().to(device) for _ in lrs]
    biases = [torch.zeros(c, device=device) for _ in lrs]
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    n = len(y_all)
    bs = min(batch_size, n)
    steps_per_epoch = (n + bs - 1) // bs
    # linear scaling rule (Goyal et al.), as DINO; T_max as the single-head loop's scheduler
    schedules = [cosine_lrs(lr * bs / 256.0, max(epochs * steps_per_epoch, 1)) for lr in lrs]
    # Small banks live on the device whole; large ones are read batch by batch from the (memory-mapped) cache.
    whole = n * d * 4 <= WHOLE_BANK_BYTES
    x_dev = _rows(features, np.arange(n), device) if whole else None
    if x_dev is not None and mean is not None:  # elementwise, so the same floats as standardising each batch
        x_dev = (x_dev - mean.to(device)) / std.to(device)
    y_dev = y_all.to(device)
    bufs: list[list[torch.Tensor]] | None = None  # per head [weight, bias] momentum buffers
    step = 0
    for _ in range(epochs):
        for idx in _batches(n, bs, gen):
            if x_dev is not None:  # index_select: the rows x_dev[idx] gives, at a third of its cost on CPU
                idx = idx.to(device)
                xb, yb = x_dev.index_select(0, idx), y_dev.index_select(0, idx)
            else:
                xb, yb = _rows(features, idx.numpy(), device), y_all[np.sort(idx.numpy())].to(device)
                if mean is not None:
                    xb = (xb - mean.to(device)) / std.to(device)
            rows = len(yb)
            # [L, B, C]: head h's logits are F.linear(xb, W_h, b_h), as nn.Linear computes them
            logits = torch.stack([torch.addmm(b, xb, w.t()) for w, b in zip(weights, biases)]).requires_grad_()
            # the sum over heads of each head's mean cross-entropy: rows (h, b) of the [L*B, C] view, summed, / B
            loss = F.cross_entropy(logits.view(n_heads * rows, c), yb.repeat(n_heads), reduction="sum") / rows
            (grad,) = torch.autograd.grad(loss, logits)
            # nn.Linear's backward (torch autograd mm_mat2_backward for the transposed weight): g^T x and sum_b g.
            # Not (x^T g)^T: the same floats, but g holds subnormals once a head is confident, which slow that
            # operand order of the BLAS down 3-5x.
            grads = [[g.t().mm(xb), g.sum(0)] for g in grad]
            if weight_decay != 0:
                grads = [[g.add(p, alpha=weight_decay) for g, p in zip(gs, ps)]
                         for gs, ps in zip(grads, zip(weights, biases))]
            if momentum == 0:
                bufs = grads
            elif bufs is None:
                bufs = [[g.clone() for g in gs] for gs in grads]
            else:
                for head_bufs, gs in zip(bufs, grads):
                    for buf, g in zip(head_bufs, gs):
                        buf.mul_(momentum).add_(g)
            for w, b, (buf_w, buf_b), schedule in zip(weights, biases, bufs, schedules):
                w.add_(buf_w, alpha=-schedule[step])  # SGD's param.add_(buf, alpha=-lr), the head's own lr
                b.add_(buf_b, alpha=-schedule[step])
            step += 1
    heads = []
    for h in range(n_heads):
        head = torch.nn.utils.skip_init(torch.nn.Linear, d, c)  # no default init: it would draw from the global RNG
        with torch.no_grad():
            w, b = weights[h].cpu(), biases[h].cpu()
            if mean is not None:  # fold: W ((x - m) / s) + b = (W / s) x + (b - (W / s) m)
                folded = w.double() / std.double()
                w, b = folded.float(), (b.double() - folded @ mean.double()).float()
            head.weight.copy_(w)
            head.bias.copy_(b)
        heads.append(head.eval())
    return heads


def train_linear_head(features: Any, labels: np.ndarray, num_classes: int, *, lr: float, epochs: int,
                      batch_size: int, momentum: float, weight_decay: float, seed: int,
                      device: torch.device | str = "cpu", standardise: bool = False) -> torch.nn.Linear:
    """Train a linear head on features [N, D] -> logits [N, C] with SGD + cosine schedule; returns it on CPU
    (:func:`train_linear_heads` with one lr).

    ``standardise``: train on (x - m) / s with the rows' per-dimension mean m and std s [D], then fold them into the
    returned layer, which therefore takes raw features."""
    (head,) = train_linear_heads(features, labels, num_classes, lrs=[lr], epochs=epochs, batch_size=batch_size,
                                 momentum=momentum, weight_decay=weight_decay, seed=seed, device=device,
                                 standardise=standardise)
    return head
