"""Benchmark: ProSMin's vectorised energy score vs per-pair Python loops (forward + backward).

Shapes (docs/protocols.md "ProSMin (the method)"): r = 4 samples, 18 online views (2 global + 16 local), 2 target views,
N = 64 images per process, D = 4096 outputs. Three formulations of the same loss, timed side by side:

- ``vectorised``: ``multiview_energy_score`` (batched ``cdist``; the sample-sample term once per view);
- ``released``: the released code's loop over (sample, target, view) with one ``F.l1_loss`` each, plus its loop
  over sample pairs (amirvhd/SSL-sore-rule ``scoreloss.py``);
- ``naive``: a Python loop over (target view, online view) pairs calling the single-pair ``energy_score``.

Run: ``python benchmarks/bench_loss.py [--threads 2] [--repeats 5] [--D 4096]``. Prints milliseconds (median)
and the ratios naive / vectorised and released / vectorised.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from prosmin_bench.pretrain.losses import energy_score, multiview_energy_score

LAM = 1.0 / 2.2  # released lam_code = 2.4 (docs/protocols.md)


def vectorised(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = mu[:, None] + sigma[:, None] * eps  # [V, r, N, D]
    return multiview_energy_score(z, targets, beta=1.0, lam=LAM, distance="l1")[0]


def naive(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = mu[:, None] + sigma[:, None] * eps
    total, n = 0.0, 0
    for t in range(targets.shape[0]):
        for v in range(z.shape[0]):
            total = total + energy_score(z[v], targets[t], beta=1.0, lam=LAM, distance="l1")
            n += 1
    return total / n


def released(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    V, r, N, D = eps.shape
    # the released code's layout: samples [r, V * N, D], views concatenated along the batch
    z = (mu[:, None] + sigma[:, None] * eps).permute(1, 0, 2, 3).reshape(r, V * N, D)
    chunks = z.chunk(V, dim=1)
    first, second, n = 0.0, 0.0, 0
    for i in range(r):
        for q in targets.unbind(0):
            for v in range(V):
                first = first + 2 * F.l1_loss(chunks[v][i], q)
                n += 1
        for j in range(i + 1, r):
            second = second - (1 / (r - 1)) * F.l1_loss(z[i], z[j])
    return 10 * (first / n + 2.4 * second / r) / 22.0  # /22: the same value as the other two


def time_fn(fn, args, repeats: int) -> tuple[float, float]:
    times = []
    value = 0.0
    for _ in range(repeats + 1):  # first call warms up
        for a in args[:2]:
            a.grad = None
        t0 = time.perf_counter()
        loss = fn(*args)
        loss.backward()
        times.append(time.perf_counter() - t0)
        value = loss.item()
    return statistics.median(times[1:]) * 1e3, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--views", type=int, default=18)
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--N", type=int, default=64)
    p.add_argument("--D", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    dev = torch.device(a.device)
    mu = torch.randn(a.views, a.N, a.D, generator=g).to(dev).requires_grad_(True)
    sigma = torch.rand(a.views, a.N, a.D, generator=g).to(dev).requires_grad_(True)
    eps = torch.randn(a.views, a.r, a.N, a.D, generator=g).to(dev)
    targets = torch.randn(a.targets, a.N, a.D, generator=g).to(dev)
    args = (mu, sigma, eps, targets)
    print(f"r={a.r} views={a.views} targets={a.targets} N={a.N} D={a.D} device={dev} threads={a.threads} "
          f"(forward + backward, median of {a.repeats})")
    results = {}
    for name, fn in (("vectorised", vectorised), ("naive per-pair loop", naive), ("released-code loop", released)):
        ms, val = time_fn(fn, args, a.repeats)
        results[name] = ms
        print(f"  {name:22s} {ms:9.1f} ms   loss {val:.6f}")
    v = results["vectorised"]
    print(f"ratio naive / vectorised:    {results['naive per-pair loop'] / v:.2f}x")
    print(f"ratio released / vectorised: {results['released-code loop'] / v:.2f}x")


if __name__ == "__main__":
    main()
