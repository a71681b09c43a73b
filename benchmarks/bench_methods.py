"""Benchmark: one pretraining step of DINO, iBOT and MoCo-v3 relative to ProSMin, at their micro recipes.

A step is what the training loop does (``pretrain/train.py``): forward of the method on a multi-crop batch from
the recipe's augmentation, backward, per-parameter gradient clipping, AdamW step, EMA update of the target. Every
method is built from its ``*_micro`` recipe (same data, crops, batch and optimiser as ``prosmin_micro``; MoCo-v3
without local crops). The methods are timed in one process, round-robin (one step of each in turn, the order
rotating every round), so load from other processes affects them alike; the augmentation is timed separately
and excluded. Reports the median step time in milliseconds and the ratio to ProSMin's.

For comparison, the ProSMin paper's Table 7 (ViT-S/16, 300 ImageNet epochs) reports ProSMin 98.0 h on 8 GPUs
(784 GPU-hours) against DINO 72.6 h and iBOT 73.8 h on 16 GPUs (1162 and 1181 GPU-hours).

Run: ``python benchmarks/bench_methods.py [--threads 2] [--steps 10] [--warmup 2] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
from prosmin_bench.pretrain.data import PretrainData
from prosmin_bench.pretrain.methods import Progress
from prosmin_bench.pretrain.recipes import get_recipe
from prosmin_bench.pretrain.train import build_method, clip_gradients_per_parameter

RECIPES = ("prosmin_micro", "dino_micro", "ibot_micro", "mocov3_micro")


class Stepper:
    """One method with its optimiser and an endless supply of augmented batches."""

    def __init__(self, recipe: str, device: torch.device) -> None:
        self.cfg = get_recipe(recipe).config
        torch.manual_seed(0)
        self.method = build_method(self.cfg).to(device).train()
        self.data = PretrainData(self.cfg, device)
        self.opt = torch.optim.AdamW(self.method.param_groups(), lr=1e-4)
        self.params = [p for _, p in self.method.trainable_named_parameters()]
        self.epoch, self.batches, self.step_i = 0, self.data.batches(0), 0
        self.total = self.cfg.optim.epochs * self.data.steps_per_epoch
        self.times: list[float] = []
        self.aug_times: list[float] = []

    def next_batch(self):
        t = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = self.data.batches(self.epoch)
            batch = next(self.batches)
        self.aug_times.append(time.perf_counter() - t)
        return batch

    def step(self, record: bool) -> None:
        batch = self.next_batch()
        progress = Progress(step=self.step_i, total_steps=self.total, steps_per_epoch=self.data.steps_per_epoch)
        t = time.perf_counter()
        loss, _ = self.method(batch, progress)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_parameter(self.params, self.cfg.optim.clip_grad)
        self.opt.step()
        if self.method.target is not None:
            self.method.update_target(self.method.momentum_at(progress))
        if batch.global_views[0].is_cuda:
            torch.cuda.synchronize()
        if record:
            self.times.append(time.perf_counter() - t)
        self.step_i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steppers = {r: Stepper(r, device) for r in RECIPES}
    for i in range(args.warmup + args.steps):
        order = RECIPES[i % len(RECIPES):] + RECIPES[: i % len(RECIPES)]
        for r in order:
            steppers[r].step(record=i >= args.warmup)
    base = statistics.median(steppers["prosmin_micro"].times)
    print(f"device {device}, {args.threads} threads, {args.steps} timed steps per method (median), batch "
          f"{steppers['prosmin_micro'].cfg.optim.batch_size}")
    print(f"{'recipe':<15}{'views':>7}{'step ms':>10}{'vs ProSMin':>12}{'augment ms':>12}{'params':>10}")
    for r, s in steppers.items():
        med = statistics.median(s.times)
        views = f"{s.cfg.crops.global_crops}+{s.cfg.crops.local_crops}"
        n_params = sum(p.numel() for p in s.params)
        print(f"{r:<15}{views:>7}{1000 * med:>10.1f}{med / base:>12.2f}{1000 * statistics.median(s.aug_times):>12.1f}"
              f"{n_params:>10,}")


if __name__ == "__main__":
    main()
