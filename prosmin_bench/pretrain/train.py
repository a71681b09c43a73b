"""The pretraining loop, top to bottom: set up -> (resume) -> steps -> checkpoints.

Per step: lr and weight decay from their schedules (DINO ``cosine_scheduler``: linear warm-up then cosine decay
of the lr; cosine weight decay), forward under autocast, non-finite check (on every process at once),
backward, optional freezing of the head's last layer, DINO's per-parameter gradient clipping, AdamW step, EMA
update of the target, one JSONL log line (rank 0), checkpoint every ``run.checkpoint_every_steps``, at the end,
and at the step where Ctrl-C or SIGTERM arrived (rank 0, atomic; then the signal goes on: ``DeferredStop``).
``torch.distributed`` is only reached through ``prosmin_bench.distributed``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import timm
import torch

from .. import distributed
from ..atomic import atomic_write_text
from ..devices import resolve_device
from ..errors import PretrainError
from ..progress import bar as progress_bar
from . import checkpoint as ckpt_io
from .config import PretrainConfig
from .data import PretrainData
from .interrupt import DeferredStop
from .methods import METHODS, PretrainMethod, Progress, build_backbone_factory
from .monitor import CollapseMonitor, target_modules
from .schedules import Schedules, autocast_context, clip_gradients_per_parameter, make_schedules, resolve_precision

log = logging.getLogger(__name__)

LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"


# ----------------------------------------------------------------------------------------------------- loop
def build_method(cfg: PretrainConfig) -> PretrainMethod:
    """The method of ``cfg`` with a fresh backbone (seed the global RNG first for a reproducible init)."""
    cls = METHODS.get(cfg.method)
    factory = build_backbone_factory(cfg.arch, cfg.arch_kwargs)
    return cls(cfg.method_config, backbone_factory=factory, crops=cfg.crops)


def config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Config keys that differ between a checkpoint and the requested run (``run.*`` may differ on resume)."""
    diffs = []
    for section in sorted(set(saved) | set(now)):
        if section == "run":
            continue
        a, b = saved.get(section), now.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(section)
    return diffs


def _truncate_log(path: Path, last_step: int) -> None:
    """Keep the log lines of steps < ``last_step`` (those a resumed run will not redo)."""
    if not path.is_file():
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] < last_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    atomic_write_text(path, "".join(keep))


def run_pretraining(cfg: PretrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                    device: str = "auto") -> Path:
    """Train ``cfg`` and write ``out_dir/checkpoint.pt`` (and ``out_dir/log.jsonl``); returns the checkpoint path.

    Works in a single process and under ``torchrun`` (joins the process group from the environment).
    Raises PretrainError naming the step when the loss becomes non-finite (the last good checkpoint stays).
    """
    return Pretrainer(cfg, out_dir, resume=resume, device=device).run()


class Pretrainer:
    """One run: ``__init__`` sets everything up (process group, method, data, optimiser, resumed state);
    ``run()`` is the loop. ``method`` stays available afterwards (the DDP test compares ranks with it)."""

    def __init__(self, cfg: PretrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                 device: str = "auto") -> None:
        self.cfg = cfg
        self.dinfo = distributed.init_from_env(device)
        self.device = dev = resolve_device(device)  # under torchrun, this process's GPU
        self.out_dir = Path(out_dir)
        self.ckpt_path, self.log_path = self.out_dir / CHECKPOINT_NAME, self.out_dir / LOG_NAME
        self.is_main = distributed.is_main()

        saved = None
        if self.ckpt_path.is_file():
            if not resume:
                raise PretrainError(
                    f"A checkpoint already exists at {str(self.ckpt_path)!r}; pass --resume to continue it, or "
                    "--out DIR for a new run (or delete it)"
                )
            saved = ckpt_io.load(self.ckpt_path)
            diffs = config_differences(saved["config"], cfg.to_dict())
            if diffs:
                raise PretrainError(
                    f"Cannot resume {str(self.ckpt_path)!r}: the requested config differs in {diffs[:6]}; resume "
                    "with the same recipe, --epochs and --set values, or start a new run with --out DIR"
                )
        elif resume:
            log.info("no checkpoint at %s: starting a new run", self.ckpt_path)
        distributed.barrier()  # nobody writes before every process has read the checkpoint

        ckpt_io.seed_rngs(cfg.run.seed)  # same initial weights on every process (DDP also broadcasts them)
        self.method = method = build_method(cfg).to(dev)
        self.data = PretrainData(cfg, dev)
        self.sched = make_schedules(cfg, self.data.steps_per_epoch)
        self.optimizer = torch.optim.AdamW(method.param_groups(), lr=0.0, betas=cfg.optim.betas)
        self.precision = resolve_precision(cfg.run.precision, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.precision == "fp16")
        self.step = 0
        if saved is not None:
            self._restore(saved)
        else:
            ckpt_io.seed_rngs(cfg.run.seed + self.dinfo.rank)  # drop path differs per process, as in any DDP run
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _truncate_log(self.log_path, self.step)
            atomic_write_text(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    def _restore(self, saved: dict[str, Any]) -> None:
        m = self.method
        m.online.load_state_dict(saved["online"], strict=True)
        if m.target is not None:
            m.target.load_state_dict(saved["target"], strict=True)
        m.load_extra_state(saved["method_state"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        self.step = int(saved["step"])
        rngs, world = saved["rng"], self.dinfo.world_size
        if saved.get("world_size") == world and len(rngs) == world:
            ckpt_io.set_rng_state(rngs[self.dinfo.rank])
        else:
            log.warning("resuming with %d processes a run saved with %s: drop-path randomness restarts",
                        world, saved.get("world_size"))
            ckpt_io.seed_rngs(self.cfg.run.seed + 1000 * self.dinfo.rank + self.step)
        log.info("resuming %s from step %d of %d", self.ckpt_path, self.step, self.sched.total_steps)

    def save(self, at_step: int) -> None:
        """Atomic checkpoint by rank 0 (with every process's generator states); all processes wait for it."""
        rngs = distributed.all_gather_object(ckpt_io.rng_state())
        if self.is_main:
            ckpt_io.save_atomic(
                _checkpoint_dict(self.cfg, self.method, self.optimizer, self.scaler, self.sched, at_step,
                                 self.data.steps_per_epoch, rngs, self.dinfo.world_size),
                self.ckpt_path,
            )
            log.info("checkpoint at step %d -> %s", at_step, self.ckpt_path)
        distributed.barrier()

    def run(self) -> Path:
        cfg, method, optimizer, scaler, sched, dev = (self.cfg, self.method, self.optimizer, self.scaler,
                                                      self.sched, self.device)
        spe, total, step = self.data.steps_per_epoch, sched.total_steps, self.step
        end = total if cfg.run.max_steps is None else min(total, cfg.run.max_steps)
        if step >= end:
            log.info("nothing to do: checkpoint at step %d, run ends at %d", step, end)
            return self.ckpt_path
        model = distributed.wrap_ddp(method, dev, find_unused_parameters=method.has_unused_parameters)
        trainable = [p for _, p in method.trainable_named_parameters()]
        last_layer = [p for n, p in method.online.named_parameters() if ".last_layer." in f".{n}"]
        method.train()
        # collapse statistics of the target's own outputs (forward hooks: no extra forward); logging rank only
        monitor = CollapseMonitor(cfg.run.monitor_every if self.is_main else 0, cfg.run.collapse_warn_fraction)
        monitor.watch(target_modules(method))
        # rank 0 only (progress.py); with progress off, a log line every 5% of the run instead
        bar = progress_bar(desc="pretrain", total=total, initial=step, unit="step", dynamic_ncols=True)
        logf = open(self.log_path, "a") if self.is_main else None
        log_every_plain = max(1, (end - step) // 20)
        stop = DeferredStop().install()
        try:
            epoch = step // spe
            batches = self.data.batches(epoch, step - epoch * spe)
            t_last = time.perf_counter()
            while step < end:
                if step // spe != epoch:
                    epoch = step // spe
                    batches = self.data.batches(epoch, 0)
                batch = next(batches)
                progress = Progress(step=step, total_steps=total, steps_per_epoch=spe)
                lr, wd = sched.lr(step), sched.weight_decay(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                    if g.get("apply_wd", True):
                        g["weight_decay"] = wd

                with autocast_context(self.precision, dev), monitor.capture(step):
                    loss, logs = model(batch, progress)
                # the same on every process, so all stop together (on a non-finite loss or a signal to any of them)
                stats = _reduce_stats(loss, logs, stop=stop.requested)
                stop_all = stats.pop(_STOP_KEY) > 0
                if not math.isfinite(stats["loss"]):
                    have = self.ckpt_path.is_file()
                    raise PretrainError(
                        f"Non-finite loss ({stats['loss']}) at step {step} (epoch {epoch}); training stopped. "
                        + (f"The last good checkpoint is {str(self.ckpt_path)!r}" if have else "No checkpoint was "
                           "written yet") + "; lower optim.lr, raise optim.warmup_epochs or use run.precision=fp32"
                    )
                collapse = monitor.collect(step)  # {} except every run.monitor_every steps on the logging rank
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if progress.epoch_float < cfg.optim.freeze_last_layer_epochs:
                    for p in last_layer:  # DINO cancel_gradients_last_layer
                        p.grad = None
                method.before_optimizer_step(progress)
                grad_norm = clip_gradients_per_parameter(trainable, cfg.optim.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                momentum = method.momentum_at(progress) if method.target is not None else None
                if momentum is not None:
                    method.update_target(momentum)
                step += 1
                self.step = step

                now = time.perf_counter()
                ips = cfg.optim.batch_size / max(now - t_last, 1e-9)
                t_last = now
                if logf is not None:
                    record = {"step": step - 1, "epoch": epoch, **stats, "lr": lr, "wd": wd, "momentum": momentum,
                              "grad_norm": grad_norm, "images_per_s": ips, **collapse}
                    if (step - 1) % cfg.run.log_every_steps == 0 or step == end or collapse:
                        logf.write(json.dumps(record) + "\n")
                        logf.flush()
                    if not bar.disable:
                        bar.update(1)
                        bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
                    elif (step - 1) % log_every_plain == 0 or step == end:
                        log.info("step %d/%d loss %.5f lr %.3g %.0f img/s", step, total, stats["loss"], lr, ips)
                periodic = step % cfg.run.checkpoint_every_steps == 0 or step == end
                if periodic:
                    self.save(step)
                # Under DDP every process must take the same decision (saving is collective): the one reduced above.
                if stop_all if self.dinfo.world_size > 1 else stop.requested:
                    if not periodic:
                        self.save(step)
                    stop.reraise(self.ckpt_path, step)
            if stop.requested:  # signalled during the final checkpoint: the run is complete, the signal still counts
                stop.reraise(self.ckpt_path, step)
        finally:
            stop.uninstall()
            monitor.close()
            if logf is not None:
                logf.close()
            bar.close()
        return self.ckpt_path


#: Key of the "a process was signalled" flag reduced with the step's statistics (not logged).
_STOP_KEY = "_stop"


def _reduce_stats(loss: torch.Tensor, logs: dict[str, Any], *, stop: bool = False) -> dict[str, float]:
    """Loss and logs averaged over processes, as floats (one all-reduce of a small vector), with ``_STOP_KEY``
    above 0 when any process asked to stop."""
    names = ["loss", *logs, _STOP_KEY]
    vals = [loss.detach().float().reshape(())]
    vals += [torch.as_tensor(v, dtype=torch.float32, device=loss.device).detach().reshape(()) for v in logs.values()]
    vals.append(torch.tensor(float(stop), device=loss.device))
    reduced = distributed.all_reduce_mean(torch.stack(vals)).tolist()
    return dict(zip(names, reduced))


def _checkpoint_dict(cfg: PretrainConfig, method: PretrainMethod, optimizer, scaler, sched: Schedules, step: int,
                     spe: int, rngs: list[dict[str, Any]], world: int) -> dict[str, Any]:
    last = max(step - 1, 0)
    p = Progress(step=last, total_steps=sched.total_steps, steps_per_epoch=spe)
    return {
        "format": ckpt_io.FORMAT,
        "format_version": ckpt_io.FORMAT_VERSION,
        "recipe": cfg.recipe,
        "method": cfg.method,
        "arch": cfg.arch,
        "arch_kwargs": dict(cfg.arch_kwargs),
        "config": cfg.to_dict(),
        "step": step,
        "total_steps": sched.total_steps,
        "steps_per_epoch": spe,
        "epoch": step // spe,
        "finished": step >= sched.total_steps,
        "online": _cpu_state(method.online.state_dict()),
        "target": _cpu_state(method.target.state_dict()) if method.target is not None else {},
        "method_state": _cpu_state(method.extra_state()),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "schedules": {"step": step, "lr": sched.lr(last), "weight_decay": sched.weight_decay(last),
                      "momentum": method.momentum_at(p) if method.target is not None else None},
        "rng": rngs,
        "world_size": world,
        "versions": _versions(),
    }


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _versions() -> dict[str, str]:
    try:
        own = version("prosmin-bench")
    except PackageNotFoundError:  # running from a checkout that is not installed
        own = "unknown"
    return {"torch": str(torch.__version__), "timm": str(timm.__version__), "prosmin-bench": own}
