"""Dimensional-collapse monitoring during pretraining (issue 7): cheap statistics of the target's own outputs.

Every ``every`` steps the loop records the effective rank (RankMe, Garrido et al., ICML 2023) and the mean
per-dimension standard deviation of the L2-normalised embeddings (SimSiam's collapse indicator, Chen & He,
CVPR 2021, Sec. 4.1) of the outputs the target network already computed for the current batch: forward hooks keep
a detached reference to the first output of each watched module during a due step, so no extra forward runs.
The run warns once per watched embedding when its effective rank falls below ``warn_fraction`` of its attainable
rank min(B - 1, K) (B rows of the batch, K its width; centring removes one dimension). "Falls": only after a
measurement at or above the threshold. Random initialisations are narrow (vit_micro's target backbone: effective
rank 15 of 96 on a digits training batch; the prosmin_micro head, whose 64-d bottleneck caps its rank, 11 of 255),
and a warning spent on the initialisation would hide the collapse that comes later. Under DDP only the process
that writes the log should monitor (the statistics are of its local batch).

The arithmetic is ``prosmin_bench.metrics`` in float64 on the CPU (one thread): a [256, 256] batch takes about
10 ms, [128, 12000] 0.15 s, [1024, 12000] 5 s. The effective rank of a batch at most as wide as it is tall (K <= B)
comes from the streaming metric ``metrics.stateful.EffectiveRank`` (update with the batch, compute; its [K, K]
covariance then costs no more than the SVD: [256, 256] ~10 ms either way, [1024, 1024] 0.3 s); wider batches (heads
of 12000 or 65536 outputs, where a [K, K] float64 state would take 1.1 or 32 GiB) use the SVD of the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ..metrics import MetricArgumentError, effective_rank, per_dim_std
from .config import ConfigError

log = logging.getLogger(__name__)


def batch_collapse_stats(embeddings: Any) -> dict[str, float]:
    """Collapse statistics of one batch of embeddings [B, K] (B >= 2; torch tensor on any device, or numpy).

    Returns ``{"effective_rank": RankMe of the centred batch, "per_dim_std": mean std of the L2-normalised rows}``.
    """
    if hasattr(embeddings, "detach"):  # a torch tensor (maybe bf16, on a GPU): one copy to the CPU for both
        embeddings = embeddings.detach().cpu().double().numpy()
    spread = per_dim_std(embeddings)  # checks the batch first: 2-D, >= 2 rows, finite (else MetricArgumentError)
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.shape[1] > rows.shape[0]:  # wide: the SVD of the batch is the cheaper route
        return {"effective_rank": effective_rank(rows), "per_dim_std": spread}
    # Imported here: torchmetrics adds about 1.2 s to importing the training code (measured on 2 cores).
    from ..metrics.stateful import EffectiveRank

    # The local batch only: under DDP only the logging process monitors, so a sync in compute() (torchmetrics' default
    # when a process group exists) would wait forever for the other ranks.
    rank = EffectiveRank(num_features=rows.shape[1], sync_on_compute=False)
    rank.update(torch.from_numpy(rows))
    return {"effective_rank": float(rank.compute()), "per_dim_std": spread}


def attainable_rank(n_rows: int, width: int) -> int:
    """The largest effective rank a centred [n_rows, width] matrix can have: min(n_rows - 1, width)."""
    return max(min(n_rows - 1, width), 1)


def target_modules(method: Any) -> dict[str, Any]:
    """The modules whose outputs are watched: ``backbone`` (the evaluated backbone: the EMA target's, or the
    online one for methods without a target) and, when that network has one, ``head`` (its projection head)."""
    net = method.target if getattr(method, "target", None) is not None else method.online
    modules = {"backbone": net.backbone}
    head = getattr(net, "head", None)
    if head is not None:
        modules["head"] = head
    return modules


class CollapseMonitor:
    """Every-N-steps collapse statistics with a warn-once rule.

    Args:
        every: measure at steps 0, every, 2 * every, ...; 0 turns monitoring off (e.g. on non-logging ranks).
        warn_fraction: warn (once per embedding) when effective_rank falls below warn_fraction * min(B - 1, K)
            after having been at or above it; 0 never warns.

    Direct use: ``stats = monitor.observe(step, {"head": outputs})`` (``{}`` when the step is not due). In a
    training loop without access to the outputs, ``monitor.watch(target_modules(method))`` once, run the forward
    inside ``with monitor.capture(step):`` and call ``monitor.collect(step)`` after it. Keys of the returned dict:
    ``<name>_effective_rank`` and ``<name>_per_dim_std``.
    """

    def __init__(self, every: int, warn_fraction: float) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ConfigError(f"Expected run.monitor_every to be a non-negative integer, but got {every!r}")
        if not isinstance(warn_fraction, (int, float)) or not 0.0 <= warn_fraction <= 1.0:
            raise ConfigError(f"Expected run.collapse_warn_fraction to be in [0, 1], but got {warn_fraction!r}")
        self.every = every
        self.warn_fraction = float(warn_fraction)
        self.warned: set[str] = set()  # embeddings already warned about
        self._above: set[str] = set()  # embeddings measured at or above the threshold at least once
        self._hooks: list[Any] = []
        self._armed = False
        self._captured: dict[str, Any] = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def observe(self, step: int, embeddings: Mapping[str, Any]) -> dict[str, float]:
        """Statistics of each named batch [B, K] when ``step`` is due (else ``{}``); logs and warns."""
        if not self.due(step):
            return {}
        out: dict[str, float] = {}
        for name, x in embeddings.items():
            if x.ndim != 2 or x.shape[0] < 2:
                log.debug("collapse monitor: %s output has shape %s, not [B >= 2, K]; skipped", name, tuple(x.shape))
                continue
            try:
                stats = batch_collapse_stats(x)
            except MetricArgumentError as exc:  # e.g. inf outputs: the loop's loss check owns stopping the run
                log.warning("step %d: collapse statistics of the %s outputs skipped (%s)", step, name, exc)
                continue
            n, k = int(x.shape[0]), int(x.shape[1])
            top = attainable_rank(n, k)
            out[f"{name}_effective_rank"] = stats["effective_rank"]
            out[f"{name}_per_dim_std"] = stats["per_dim_std"]
            log.info("step %d: %s effective rank %.2f of %d attainable, per-dimension std %.4g (x sqrt(K) = %.3f)",
                     step, name, stats["effective_rank"], top, stats["per_dim_std"], stats["per_dim_std"] * k ** 0.5)
            if stats["effective_rank"] >= self.warn_fraction * top:
                self._above.add(name)
            elif name in self._above and name not in self.warned:
                self.warned.add(name)
                log.warning(
                    "step %d: the %s outputs look collapsed: effective rank %.2f is below %.3g of the attainable %d "
                    "(batch of %d, width %d), down from at or above it earlier in the run. Check the method's "
                    "centring, temperatures, spread term or EMA schedule (shown once)",
                    step, name, stats["effective_rank"], self.warn_fraction, top, n, k,
                )
        return out

    # ----------------------------------------------------------------------------- hooks: no extra forward
    def watch(self, modules: Mapping[str, Any]) -> None:
        """Keep the first output of each module (an ``nn.Module``) during armed steps; see :meth:`capture`."""
        if self.every == 0:
            return
        for name, module in modules.items():
            self._hooks.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: Any, inputs: Any, output: Any) -> None:
            # The first call of a step is the global views (multi-crop runs them first); later calls (local
            # crops of an online network) are ignored. A reference, not a copy: the forward made it anyway.
            if self._armed and name not in self._captured and hasattr(output, "detach"):
                self._captured[name] = output.detach()

        return hook

    @contextmanager
    def capture(self, step: int) -> Iterator[None]:
        """Arm the hooks for the forward run inside the block, when ``step`` is due."""
        self._captured.clear()
        self._armed = self.due(step)
        try:
            yield
        finally:
            self._armed = False

    def collect(self, step: int) -> dict[str, float]:
        """:meth:`observe` on what the hooks kept during ``step`` (``{}`` when nothing was kept), then forget it."""
        captured, self._captured = self._captured, {}
        return self.observe(step, captured) if captured else {}

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._captured.clear()
