"""ProSMin's scoring rules against direct loop evaluations of the formulas (docs/protocols.md "ProSMin (the method)")."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prosmin_bench.errors import ProsminBenchError
from prosmin_bench.pretrain.losses import (
    energy_score,
    kernel_score,
    multiview_energy_score,
    multiview_kernel_score,
)


def _d(a: torch.Tensor, b: torch.Tensor, distance: str) -> float:
    diff = (a - b).double()
    return float(diff.abs().mean() if distance == "l1" else diff.pow(2).sum().sqrt())


def loop_energy(z: torch.Tensor, y: torch.Tensor, beta: float, lam: float, distance: str) -> float:
    """mean_i [(2 lam / r) sum_j d(z_ij, y_i)^b - ((1 - lam) / (r (r - 1))) sum_{j != k} d(z_ij, z_ik)^b]."""
    r, n, _ = z.shape
    total = 0.0
    for i in range(n):
        first = sum(_d(z[j, i], y[i], distance) ** beta for j in range(r))
        second = sum(_d(z[j, i], z[k, i], distance) ** beta for j in range(r) for k in range(r) if j != k)
        total += 2 * lam / r * first - (1 - lam) / (r * (r - 1)) * second
    return total / n


def loop_kernel(z: torch.Tensor, y: torch.Tensor, gamma: float, lam: float) -> float:
    r, n, _ = z.shape

    def k(a, b):
        return math.exp(-_d(a, b, "l2") ** 2 / (2 * gamma**2))

    total = 0.0
    for i in range(n):
        first = sum(k(z[j, i], y[i]) for j in range(r))
        second = sum(k(z[j, i], z[k_, i]) for j in range(r) for k_ in range(r) if j != k_)
        total += lam * (-(2 / r) * first) + (1 - lam) / (r * (r - 1)) * second
    return total / n


@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_energy_score_equals_loop(r: int, distance: str) -> None:
    g = torch.Generator().manual_seed(r)
    for beta, lam in itertools.product([0.5, 1.0, 1.5], [0.1, 1 / 2.2, 0.5, 0.9]):
        z = torch.randn(r, 6, 9, generator=g, dtype=torch.float64)
        y = torch.randn(6, 9, generator=g, dtype=torch.float64)
        got = energy_score(z, y, beta=beta, lam=lam, distance=distance)
        assert got.ndim == 0
        assert got.item() == pytest.approx(loop_energy(z, y, beta, lam, distance), rel=1e-10, abs=1e-12)


def test_energy_score_float32_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 8, 64, generator=g), torch.randn(8, 64, generator=g)
    for distance in ("l1", "l2"):
        got = energy_score(z, y, beta=1.0, lam=0.3, distance=distance)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(loop_energy(z, y, 1.0, 0.3, distance), rel=1e-5)


def test_lam_half_l2_is_half_the_textbook_energy_score() -> None:
    """lam = 0.5: 0.5 * (2 E||Z - y|| - E||Z - Z'||), i.e. Gneiting & Raftery's E||X - y|| - E||X - X'|| / 2."""
    rng = np.random.default_rng(0)
    for r, beta in [(2, 1.0), (5, 1.0), (8, 0.7)]:
        z, y = rng.normal(size=(r, 7, 5)), rng.normal(size=(7, 5))
        to_y = np.linalg.norm(z - y[None], axis=-1) ** beta  # [r, N]
        pair = np.linalg.norm(z[:, None] - z[None, :], axis=-1) ** beta  # [r, r, N], zero diagonal
        textbook = 2 * to_y.mean(0) - pair.sum((0, 1)) / (r * (r - 1))  # 2 E||Z - y|| - E||Z - Z'||
        got = energy_score(torch.from_numpy(z), torch.from_numpy(y), beta=beta, lam=0.5, distance="l2")
        assert got.item() == pytest.approx(0.5 * textbook.mean(), rel=1e-12)


@pytest.mark.parametrize("r", [2, 4, 8])
def test_kernel_score_equals_loop(r: int) -> None:
    g = torch.Generator().manual_seed(10 + r)
    for gamma, lam in itertools.product([0.5, 1.0, 3.0], [0.2, 0.5, 0.8]):
        z = torch.randn(r, 5, 3, generator=g, dtype=torch.float64)
        y = torch.randn(5, 3, generator=g, dtype=torch.float64)
        got = kernel_score(z, y, gamma=gamma, lam=lam)
        assert got.item() == pytest.approx(loop_kernel(z, y, gamma, lam), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("distance", ["l2", "l1"])
@pytest.mark.parametrize("beta", [0.5, 1.0, 1.5])
def test_energy_score_gradcheck(distance: str, beta: float) -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: energy_score(a, b, beta=beta, lam=0.3, distance=distance), (z, y))


def test_kernel_score_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kernel_score(a, b, gamma=0.8, lam=0.4), (z, y))


def test_multiview_is_the_mean_of_per_pair_scores() -> None:
    g = torch.Generator().manual_seed(3)
    V, T, r, N, D = 5, 2, 4, 6, 7
    z = torch.randn(V, r, N, D, generator=g, dtype=torch.float64)
    y = torch.randn(T, N, D, generator=g, dtype=torch.float64)
    for include_same in (True, False):
        pairs = [(v, t) for v in range(V) for t in range(T) if include_same or v != t]
        loss, s1, s2 = multiview_energy_score(z, y, beta=1.0, lam=0.3, distance="l1", pairs=pairs)
        ref = np.mean([energy_score(z[v], y[t], beta=1.0, lam=0.3, distance="l1").item() for v, t in pairs])
        assert loss.item() == pytest.approx(ref, rel=1e-12)
        assert loss.item() == pytest.approx(0.3 * s1.item() + 0.7 * s2.item(), rel=1e-12)
        # s1 / s2 are the lam = 1 / lam = 0 scores
        ref_s1 = np.mean([energy_score(z[v], y[t], lam=1.0, distance="l1").item() for v, t in pairs])
        assert s1.item() == pytest.approx(ref_s1, rel=1e-12)
        kl, _, _ = multiview_kernel_score(z, y, gamma=2.0, lam=0.6, pairs=pairs)
        kref = np.mean([kernel_score(z[v], y[t], gamma=2.0, lam=0.6).item() for v, t in pairs])
        assert kl.item() == pytest.approx(kref, rel=1e-12)


def released_code_loss(student_sample: torch.Tensor, teacher_out: list[torch.Tensor], ncrops: int,
                       lam_code: float = 2.4) -> torch.Tensor:
    """The released ``SCORELoss.forward`` arithmetic (amirvhd/SSL-sore-rule, scoreloss.py) without its 9e-6
    offsets: a loop over samples, target views and student views, one ``F.l1_loss`` each.

    student_sample: [r, V * N, D] (views concatenated along the batch); teacher_out: T tensors [N, D].
    """
    n_sample = student_sample.shape[0]
    chunks = student_sample.chunk(ncrops, dim=1)
    first, second, n_loss = 0.0, 0.0, 0
    for i in range(n_sample):
        for q in teacher_out:
            for v in range(len(chunks)):
                first = first + 2 * F.l1_loss(chunks[v][i], q)
                n_loss += 1
        for j in range(i + 1, n_sample):
            second = second - (1 / (n_sample - 1)) * F.l1_loss(student_sample[i], student_sample[j])
    return 10 * (first / n_loss + lam_code * second / n_sample)


def test_released_code_loss_is_22_times_energy_score_lam_1_over_2_2_l1() -> None:
    """docs/protocols.md: 10 (first / n + 2.4 second / r) = 20 (E|X - Y| - 0.6 E|X - X'|) = 22 ES(lam = 1/2.2, L1)."""
    g = torch.Generator().manual_seed(4)
    r, V, T, N, D = 4, 6, 2, 5, 11
    samples = torch.randn(V, r, N, D, generator=g, dtype=torch.float64)
    targets = torch.randn(T, N, D, generator=g, dtype=torch.float64)
    code_layout = samples.permute(1, 0, 2, 3).reshape(r, V * N, D)
    ref = released_code_loss(code_layout, list(targets.unbind(0)), ncrops=V)
    loss, _, _ = multiview_energy_score(samples, targets, beta=1.0, lam=1 / 2.2, distance="l1")
    assert (22.0 * loss).item() == pytest.approx(ref.item(), rel=1e-12)
    # one view, one target: the public single-pair function
    ref1 = released_code_loss(samples[0], [targets[0]], ncrops=1)
    one = energy_score(samples[0], targets[0], beta=1.0, lam=1 / 2.2, distance="l1")
    assert (22.0 * one).item() == pytest.approx(ref1.item(), rel=1e-12)


def test_zero_distance_pairs_keep_finite_gradients() -> None:
    """Identical samples (sigma = 0) must not produce NaN gradients, even for beta < 1."""
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, dtype=torch.float64)
    z = mu[None].expand(4, 3, 4)
    for distance in ("l1", "l2"):
        for beta in (0.5, 1.0):
            (grad,) = torch.autograd.grad(energy_score(z, y, beta=beta, lam=0.4, distance=distance), mu)
            assert torch.isfinite(grad).all()


def test_argument_errors() -> None:
    z, y = torch.randn(4, 3, 5), torch.randn(3, 5)
    with pytest.raises(ProsminBenchError, match="r >= 2"):
        energy_score(z[:1], y)
    with pytest.raises(ProsminBenchError, match="beta"):
        energy_score(z, y, beta=2.5)
    with pytest.raises(ProsminBenchError, match="lam"):
        energy_score(z, y, lam=1.5)
    with pytest.raises(ProsminBenchError, match="distance"):
        energy_score(z, y, distance="cosine")
    with pytest.raises(ProsminBenchError, match="target of shape"):
        energy_score(z, torch.randn(3, 6))
    with pytest.raises(ProsminBenchError, match="gamma"):
        kernel_score(z, y, gamma=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_agnostic_cuda() -> None:
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(4, 6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    for distance in ("l1", "l2"):
        cpu = energy_score(z, y, lam=0.4, distance=distance)
        gpu = energy_score(z.cuda(), y.cuda(), lam=0.4, distance=distance)
        assert gpu.device.type == "cuda"
        assert gpu.item() == pytest.approx(cpu.item(), rel=1e-10)


def test_l1_score_of_a_wide_gaussian_matches_its_closed_form_and_rewards_spread_below_lam_0414():
    """Samples N(y, sigma^2 I) around the target: E|z - y| = sigma sqrt(2/pi), E|z - z'| = 2 sigma / sqrt(pi) per
    dimension, so the L1 score is sigma (2 sqrt(2/pi) lam - (1 - lam) 2 / sqrt(pi)). It falls as sigma grows when
    lam < 1 / (1 + sqrt 2) ~= 0.414: why lam = 0.3 drove sigma to infinity in a prosmin_micro run (recipes.py),
    while the released 1/2.2 does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 256, generator=g, dtype=torch.float64)
    eps = torch.randn(300, 2, 256, generator=g, dtype=torch.float64)
    a, b = math.sqrt(2 / math.pi), 2 / math.sqrt(math.pi)
    for lam in (0.3, 1 / (1 + math.sqrt(2)), 1 / 2.2, 0.5):
        for sigma in (1.0, 10.0):
            got = energy_score(y + sigma * eps, y, lam=lam, distance="l1").item()
            want = sigma * (2 * a * lam - (1 - lam) * b)
            assert got == pytest.approx(want, abs=5e-3 * sigma), (lam, sigma)
    slope = lambda lam: (2 * a * lam - (1 - lam) * b)  # noqa: E731
    assert slope(0.3) < 0 < slope(1 / 2.2) and slope(1 / (1 + math.sqrt(2))) == pytest.approx(0, abs=1e-12)
