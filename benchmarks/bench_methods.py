"""Benchmark: one pretraining step of DINO, iBOT and MoCo-v3 relative to ProSMin, at the micro recipes (CPU) or
at the ViT-S/16 ImageNet recipes (GPU: step time and peak GPU memory, for the paper's Table 7).

A step is what the training loop does (``pretrain/train.py``): forward of the method on a multi-crop batch under
the recipe's autocast precision, backward, per-parameter gradient clipping, AdamW step, EMA update of the target.

- ``--scale micro`` (default): every method from its ``*_micro`` recipe (same data, crops, batch and optimiser
  as ``prosmin_micro``; MoCo-v3 without local crops), batches from the recipe's own augmentation (timed
  separately and excluded). The methods are timed in one process, round-robin (one step of each in turn, the
  order rotating every round), so load from other processes on a shared CPU affects them alike.
- ``--scale imagenet``: every method from its ``*_vits16_in1k`` recipe (ViT-S/16; ProSMin's K = 12000 head and
  predictor, DINO's 65536-d head, iBOT's 8192-d shared head, MoCo-v3's 4096-d projector and predictor), fed
  random tensors of the recipe's crop sizes and counts (2 x 224 + 10 or 16 x 96; MoCo-v3 2 x 224) at
  ``--batch-size`` images per GPU (64: the per-GPU batch of all three papers). No data loading is timed. On
  a GPU each method runs alone, one after the other, so that its peak memory is its own
  (``torch.cuda.max_memory_allocated``, parameters, gradients, AdamW state and activations).

For comparison, the ProSMin paper's Table 7 (ViT-S/16, 300 ImageNet epochs) reports ProSMin 98.0 h on 8 GPUs
(784 GPU-hours) and 21.1 GB, against DINO 72.6 h on 16 GPUs (1162 GPU-hours) and 15.4 GB, and iBOT 73.8 h on
16 GPUs (1181 GPU-hours) and 19.5 GB (``docs/protocols.md``, paper Table 7).

Run: ``python benchmarks/bench_methods.py [--scale micro|imagenet] [--device cpu|cuda] [--threads 2]
[--steps 10] [--warmup 2] [--batch-size N] [--set key=value ...]``. ``--set`` overrides a recipe field in every
recipe that has it (e.g. ``--set method.out_dim=256`` to try the ImageNet scale on a CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import prosmin_bench.pretrain.recipes_baselines  # noqa: F401  (registers the baselines' recipes)
from prosmin_bench.pretrain.config import ConfigError, apply_overrides, parse_overrides
from prosmin_bench.pretrain.data import PretrainData
from prosmin_bench.pretrain.methods import MultiCropBatch, Progress
from prosmin_bench.pretrain.recipes import get_recipe
from prosmin_bench.pretrain.rng import SampleRNG
from prosmin_bench.pretrain.schedules import autocast_context, clip_gradients_per_parameter, resolve_precision
from prosmin_bench.pretrain.train import build_method

METHODS = ("prosmin", "dino", "ibot", "mocov3")
SUFFIX = {"micro": "_micro", "imagenet": "_vits16_in1k"}


def recipe_configs(scale: str, overrides: dict[str, str]) -> dict[str, object]:
    """``{recipe name: config}`` for the four methods, with each override applied where the recipe has the key."""
    cfgs = {m + SUFFIX[scale]: get_recipe(m + SUFFIX[scale]).config for m in METHODS}
    for key, value in overrides.items():
        applied = 0
        for name, cfg in cfgs.items():
            try:
                cfgs[name] = apply_overrides(cfg, {key: value})
                applied += 1
            except ConfigError:
                continue
        if not applied:
            raise SystemExit(f"--set {key}={value}: no recipe of the {scale} scale has the field {key!r}")
    return cfgs


class Stepper:
    """One method with its optimiser and an endless supply of multi-crop batches."""

    def __init__(self, cfg, device: torch.device, scale: str, batch_size: int | None) -> None:
        self.cfg, self.device, self.scale = cfg, device, scale
        torch.manual_seed(0)
        self.method = build_method(cfg).to(device).train()
        self.opt = torch.optim.AdamW(self.method.param_groups(), lr=1e-4)
        self.params = [p for _, p in self.method.trainable_named_parameters()]
        self.n_params = sum(p.numel() for p in self.params)
        self.precision = resolve_precision(cfg.run.precision, device)
        if scale == "micro":
            self.data = PretrainData(cfg, device)
            self.steps_per_epoch = self.data.steps_per_epoch
            self.epoch, self.batches = 0, self.data.batches(0)
            self.batch_size = self.data.local_batch
        else:  # random tensors of the recipe's crop sizes: the step alone, no JPEG decoding or augmentation
            self.batch_size = batch_size or 64
            self.steps_per_epoch = 1000
        self.total = cfg.optim.epochs * self.steps_per_epoch
        self.step_i = 0
        self.times: list[float] = []
        self.aug_times: list[float] = []

    def next_batch(self) -> MultiCropBatch:
        t = time.perf_counter()
        if self.scale == "micro":
            try:
                batch = next(self.batches)
            except StopIteration:
                self.epoch += 1
                self.batches = self.data.batches(self.epoch)
                batch = next(self.batches)
        else:
            c, b = self.cfg.crops, self.batch_size
            ind = torch.arange(self.step_i * b, (self.step_i + 1) * b)
            g = [torch.randn(b, 3, c.global_size, c.global_size, device=self.device) for _ in range(c.global_crops)]
            loc = [torch.randn(b, 3, c.local_size, c.local_size, device=self.device) for _ in range(c.local_crops)]
            batch = MultiCropBatch(g, loc, ind, SampleRNG(0, 0, ind))
        self.aug_times.append(time.perf_counter() - t)
        return batch

    def step(self, record: bool) -> None:
        batch = self.next_batch()
        progress = Progress(step=self.step_i, total_steps=self.total, steps_per_epoch=self.steps_per_epoch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        with autocast_context(self.precision, self.device):
            loss, _ = self.method(batch, progress)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.method.before_optimizer_step(progress)
        clip_gradients_per_parameter(self.params, self.cfg.optim.clip_grad)
        self.opt.step()
        if self.method.target is not None:
            self.method.update_target(self.method.momentum_at(progress))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if record:
            self.times.append(time.perf_counter() - t)
        self.step_i += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SUFFIX), default="micro")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="images per step at --scale imagenet (default 64)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfgs = recipe_configs(args.scale, parse_overrides(args.overrides))
    names = list(cfgs)
    peak: dict[str, float] = {}
    steppers: dict[str, Stepper] = {}
    if device.type == "cuda":  # one method at a time, so that each peak is its own
        for r in names:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            s = Stepper(cfgs[r], device, args.scale, args.batch_size)
            for i in range(args.warmup + args.steps):
                s.step(record=i >= args.warmup)
            peak[r] = torch.cuda.max_memory_allocated(device) / 2**30
            s.method, s.opt, s.params = None, None, []  # free the GPU for the next method; keep the times
            steppers[r] = s
    else:  # round-robin: load from other processes on a shared CPU affects all methods alike
        steppers = {r: Stepper(cfgs[r], device, args.scale, args.batch_size) for r in names}
        for i in range(args.warmup + args.steps):
            order = names[i % len(names):] + names[: i % len(names)]
            for r in order:
                steppers[r].step(record=i >= args.warmup)
    base = statistics.median(steppers[names[0]].times)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"device {device} ({what}), scale {args.scale}, {args.steps} timed steps per method (median), "
          f"batch {steppers[names[0]].batch_size}, precision {steppers[names[0]].precision}")
    header = f"{'recipe':<22}{'views':>7}{'step ms':>10}{'vs ProSMin':>12}{'img/s':>9}{'input ms':>10}{'params':>13}"
    print(header + (f"{'peak GiB':>10}" if peak else ""))
    for r, s in steppers.items():
        med = statistics.median(s.times)
        views = f"{s.cfg.crops.global_crops}+{s.cfg.crops.local_crops}"
        line = (f"{r:<22}{views:>7}{1000 * med:>10.1f}{med / base:>12.2f}{s.batch_size / med:>9.0f}"
                f"{1000 * statistics.median(s.aug_times):>10.1f}{s.n_params:>13,}")
        print(line + (f"{peak[r]:>10.2f}" if peak else ""))


if __name__ == "__main__":
    main()
