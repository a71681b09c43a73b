"""Benchmark: the cost of being probabilistic. One ProSMin training step vs the same step with the predictor
and the sampling removed.

Both steps share everything else: the recipe's backbone, projection head, EMA target, centring, multi-crop
batch, AdamW step and EMA update. The ProSMin step runs online backbone -> head -> predictor (mu, sigma), draws
r samples per view and scores them with the energy score; the deterministic step feeds the head output itself
to the same loss with sigma = 0 (the r samples then coincide and the score reduces to 2 lam d(h, y), an L1
regression onto the centred target). Batches are augmented once beforehand: augmentation is not timed.

Run: ``python benchmarks/bench_pretrain_step.py [--recipe prosmin_micro] [--threads 2] [--steps 10]
[--set key=value ...]``. Prints milliseconds per step (median, after warm-up) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prosmin_bench.pretrain import resolve_config
from prosmin_bench.pretrain.config import parse_overrides
from prosmin_bench.pretrain.data import PretrainData
from prosmin_bench.pretrain.losses import multiview_energy_score
from prosmin_bench.pretrain.methods import Progress
from prosmin_bench.models.networks import multicrop_features
from prosmin_bench.pretrain.train import build_method


def deterministic_loss(method, batch) -> torch.Tensor:
    """The ProSMin step minus predictor and sampling: head output vs centred target, energy score at sigma = 0."""
    c = method.config
    b, n_glob = batch.batch_size, len(batch.global_views)
    with torch.no_grad():
        t_raw = method.target.forward_views(batch.global_views).float()
        targets = (t_raw - method.center).reshape(n_glob, b, -1)
    h = method.online.head(multicrop_features(method.online.backbone, batch.views)).float()
    z = h.reshape(len(batch.views), 1, b, -1).expand(-1, 2, -1, -1)  # two identical "samples"
    loss = multiview_energy_score(z, targets, beta=c.beta, lam=c.lam, distance=c.distance, pairs=method.pair_mask)[0]
    method.update_center(t_raw)
    return loss


def one_step(method, optimizer, batch, loss_fn) -> float:
    t0 = time.perf_counter()
    loss = loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.update_target(0.996)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="prosmin_micro")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = resolve_config(a.recipe, overrides=parse_overrides(a.overrides))
    dev = torch.device("cpu")
    torch.manual_seed(0)
    data = PretrainData(cfg, dev)
    it = data.batches(0)
    batches = [next(it) for _ in range(min(3, data.steps_per_epoch))]
    progress = Progress(0, 1000, data.steps_per_epoch)
    c = cfg.method_config
    print(f"recipe={a.recipe} batch={cfg.optim.batch_size} views={cfg.crops.n_views} K={c.out_dim} "
          f"predictor_hidden={c.predictor_hidden_dim} r={c.n_samples} threads={a.threads}")
    runs = {}
    for name in ("prosmin", "deterministic"):
        torch.manual_seed(0)
        method = build_method(cfg).train()
        if name == "deterministic":
            params = [p for n, p in method.online.named_parameters() if not n.startswith("predictor.")]
            loss_fn = lambda batch, m=method: deterministic_loss(m, batch)  # noqa: E731
        else:
            params = [p for p in method.online.parameters() if p.requires_grad]
            loss_fn = lambda batch, m=method: m(batch, progress)[0]  # noqa: E731
        runs[name] = (method, torch.optim.AdamW(params, lr=1e-4), loss_fn)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(a.steps + 2):  # interleaved, so both see the same machine load; two warm-up steps
        for name, (method, opt, loss_fn) in runs.items():
            dt = one_step(method, opt, batches[i % len(batches)], loss_fn)
            if i >= 2:
                times[name].append(dt)
    results = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in results.items():
        print(f"  {name:14s} {ms:8.1f} ms/step")
    print(f"ratio prosmin / deterministic (overhead of being probabilistic): "
          f"{results['prosmin'] / results['deterministic']:.2f}x")


if __name__ == "__main__":
    main()
