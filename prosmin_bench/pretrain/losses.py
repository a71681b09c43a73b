"""Proper scoring rules of ProSMin (Vahidi et al., ICLR 2024, Eq. 2 and Eq. 5/6), estimated from r samples.

With samples z_i1..z_ir of the online distribution for image i and the target y_i, the unbiased r-sample
estimates are (docs/protocols.md "ProSMin (the method)")

- energy score: mean_i [ (2 lam / r) sum_j d(z_ij, y_i)^beta
                         - ((1 - lam) / (r (r - 1))) sum_{j != k} d(z_ij, z_ik)^beta ]
- kernel score (Gaussian kernel k(a, b) = exp(-||a - b||^2 / (2 gamma^2))):
                 mean_i [ -lam (2 / r) sum_j k(z_ij, y_i) + (1 - lam) / (r (r - 1)) sum_{j != k} k(z_ij, z_ik) ]

``lam = 0.5`` with ``distance="l2"`` is half the textbook energy score E||Z - y|| - 0.5 E||Z - Z'||.
``distance="l1"`` is the mean absolute difference over the D dimensions, what the released code
(``scoreloss.py``) computes with ``F.l1_loss``; its loss ``10 * (first / n + 2.4 * second / r)`` equals
``22 * energy_score(..., lam=1/2.2, distance="l1")`` (docs/protocols.md "ProSMin").

Implementation: pairwise distances come from ``torch.cdist`` batched over images (L1, or L2 without the
matrix-product shortcut, which cancels catastrophically when samples are close), so nothing of shape
[r, V, T, N, D] is materialised, the sample-sample term is computed once per view rather than once per
(target, view) pair, and only the r (r - 1) / 2 distinct pairs j < k are evaluated (no zero distances on the
diagonal, whose gradient is undefined for beta < 1). ``benchmarks/bench_loss.py`` measures this against the
released formulation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ProsminBenchError

DISTANCES = ("l2", "l1")


class LossArgumentError(ProsminBenchError, ValueError):
    """Arguments to a scoring rule that are out of range or of the wrong shape."""


def _check(samples: torch.Tensor, targets: torch.Tensor, lam: float, *, multiview: bool) -> None:
    want = 4 if multiview else 3
    if samples.ndim != want:
        shape = "[V, r, N, D]" if multiview else "[r, N, D]"
        raise LossArgumentError(f"Expected samples of shape {shape}, but got {tuple(samples.shape)}")
    r = samples.shape[-3]
    if r < 2:
        raise LossArgumentError(f"Expected at least 2 samples per image (r >= 2), but got r={r}")
    t_shape = tuple(targets.shape[-2:])
    if targets.ndim != (3 if multiview else 2) or t_shape != tuple(samples.shape[-2:]):
        expect = "[T, N, D]" if multiview else "[N, D]"
        raise LossArgumentError(
            f"Expected target of shape {expect} with [N, D] = {tuple(samples.shape[-2:])}, but got "
            f"{tuple(targets.shape)}"
        )
    if not 0.0 <= float(lam) <= 1.0:
        raise LossArgumentError(f"Expected lam in [0, 1], but got {lam}")


def _check_beta(beta: float) -> None:
    if not 0.0 < float(beta) <= 2.0:
        raise LossArgumentError(f"Expected beta in (0, 2] (the energy score is proper for 0 < beta < 2), but got {beta}")


def _distances(samples: torch.Tensor, targets: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Minkowski-p distances (sums, not means) of samples [V, r, N, D] to targets [T, N, D] and between samples.

    Returns ``(to_target [N, V * r, T], between [V * N, r(r-1)/2])`` where ``to_target[n, v * r + j, t]`` is
    ``||z_vjn - y_tn||_p`` and ``between[v * N + n, q]`` is ``||z_v,a_q,n - z_v,b_q,n||_p`` for the q-th pair
    a_q < b_q.
    """
    V, r, N, D = samples.shape
    x = samples.permute(2, 0, 1, 3).reshape(N, V * r, D)
    y = targets.permute(1, 0, 2)
    mode = "donot_use_mm_for_euclid_dist"  # exact differences, never ||a||^2 + ||b||^2 - 2ab
    to_target = torch.cdist(x, y, p=p, compute_mode=mode)
    zz = samples.permute(0, 2, 1, 3).reshape(V * N, r, D)
    between = torch.cdist(zz, zz, p=p, compute_mode=mode)
    a, b = torch.triu_indices(r, r, offset=1, device=samples.device)
    return to_target, between[:, a, b]


def _safe_pow(d: torch.Tensor, beta: float) -> torch.Tensor:
    """``d ** beta`` for distances d >= 0 with gradient 0 (not inf * 0 = NaN) where d = 0 and beta < 1."""
    pos = d > 0
    return torch.where(pos, torch.where(pos, d, torch.ones_like(d)).pow(beta), torch.zeros_like(d))


def _scored_pairs(samples: torch.Tensor, targets: torch.Tensor,
                  pairs: torch.Tensor | Sequence[tuple[int, int]] | None) -> tuple[torch.Tensor, int]:
    """The [V, T] mask of (online view, target view) pairs to score and its count (at least one)."""
    mask = _pair_mask(samples.shape[0], targets.shape[0], pairs, samples.device)
    n_pairs = int(mask.sum())
    if n_pairs == 0:
        raise LossArgumentError("Expected at least one (online view, target view) pair to score, but got none")
    return mask, n_pairs


def _pair_mask(V: int, T: int, pairs: torch.Tensor | Sequence[tuple[int, int]] | None,
               device: torch.device) -> torch.Tensor:
    if pairs is None:
        return torch.ones(V, T, dtype=torch.bool, device=device)
    if isinstance(pairs, torch.Tensor) and pairs.dtype == torch.bool:
        if tuple(pairs.shape) != (V, T):
            raise LossArgumentError(f"Expected a pair mask of shape [V, T] = {(V, T)}, but got {tuple(pairs.shape)}")
        return pairs.to(device)
    mask = torch.zeros(V, T, dtype=torch.bool, device=device)
    for v, t in pairs:
        mask[int(v), int(t)] = True
    return mask


def multiview_energy_score(
    samples: torch.Tensor, targets: torch.Tensor, *, beta: float = 1.0, lam: float = 0.5, distance: str = "l2",
    pairs: torch.Tensor | Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Energy score averaged over (online view v, target view t) pairs.

    Args:
        samples: [V, r, N, D], r samples per image of each of V online views.
        targets: [T, N, D], T target views.
        pairs: a bool mask [V, T] (or a list of (v, t)) of the pairs to score; ``None`` scores all V * T.

    Returns:
        ``(loss, s1, s2)``: ``loss = mean over pairs of energy_score(samples[v], targets[t])`` and its two parts
        ``s1 = mean over pairs of mean_i (2 / r) sum_j d^beta`` and
        ``s2 = mean over pairs of -mean_i (1 / (r (r - 1))) sum_{j != k} d^beta``, so
        ``loss = lam * s1 + (1 - lam) * s2``.
    """
    _check(samples, targets, lam, multiview=True)
    _check_beta(beta)
    if distance not in DISTANCES:
        raise LossArgumentError(f"Expected distance 'l2' or 'l1', but got {distance!r}")
    V, r, N, D = samples.shape
    T = targets.shape[0]
    mask, n_pairs = _scored_pairs(samples, targets, pairs)
    to_target, between = _distances(samples, targets, p=1.0 if distance == "l1" else 2.0)
    if distance == "l1":  # mean absolute difference over D, as F.l1_loss in the released code
        to_target, between = to_target / D, between / D
    if beta != 1.0:
        to_target, between = _safe_pow(to_target, beta), _safe_pow(between, beta)
    # S1 per (v, t): (2 / r) sum_j d^beta averaged over images -> [V, T]
    s1_vt = 2.0 * to_target.reshape(N, V, r, T).mean(dim=(0, 2))
    # S2 per v: -(1 / (r (r - 1))) sum_{j != k} = -mean over the r (r - 1) / 2 pairs j < k -> [V]
    s2_v = -between.reshape(V, N, -1).mean(dim=(1, 2))
    w = mask.to(samples.dtype)
    s1 = (s1_vt * w).sum() / n_pairs
    s2 = (s2_v * w.sum(dim=1)).sum() / n_pairs
    return lam * s1 + (1.0 - lam) * s2, s1, s2


def energy_score(samples: torch.Tensor, target: torch.Tensor, beta: float = 1.0, lam: float = 0.5,
                 distance: str = "l2") -> torch.Tensor:
    """ProSMin's energy score (paper Eq. 2), unbiased in r samples; lower is better.

    Args:
        samples: [r, N, D], r >= 2 draws from the online distribution per image.
        target: [N, D], the target network's (centred) output.
        beta: exponent in (0, 2]; 1 in the paper.
        lam: weight of the sample-target term (1 - lam on the sample-sample term); 0.5 = half the proper
            energy score.
        distance: ``"l2"`` (Euclidean norm) or ``"l1"`` (mean absolute difference over D).

    Returns:
        A 0-d tensor: mean_i [ (2 lam / r) sum_j d(z_ij, y_i)^beta - ((1 - lam) / (r (r - 1)))
        sum_{j != k} d(z_ij, z_ik)^beta ].
    """
    _check(samples, target, lam, multiview=False)
    loss, _, _ = multiview_energy_score(samples[None], target[None], beta=beta, lam=lam, distance=distance)
    return loss


def multiview_kernel_score(
    samples: torch.Tensor, targets: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.5,
    pairs: torch.Tensor | Sequence[tuple[int, int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel score averaged over (online view, target view) pairs; see :func:`multiview_energy_score`.

    Returns ``(loss, s1, s2)`` with ``s1 = -mean (2 / r) sum_j k(z_ij, y_i)``,
    ``s2 = mean (1 / (r (r - 1))) sum_{j != k} k(z_ij, z_ik)`` and ``loss = lam * s1 + (1 - lam) * s2``.
    """
    _check(samples, targets, lam, multiview=True)
    if not float(gamma) > 0.0:
        raise LossArgumentError(f"Expected a positive kernel bandwidth gamma, but got {gamma}")
    V, r, N, D = samples.shape
    T = targets.shape[0]
    mask, n_pairs = _scored_pairs(samples, targets, pairs)
    to_target, between = _distances(samples, targets, p=2.0)
    scale = 1.0 / (2.0 * float(gamma) ** 2)
    k_target = torch.exp(-to_target.pow(2) * scale)
    k_between = torch.exp(-between.pow(2) * scale)
    s1_vt = -2.0 * k_target.reshape(N, V, r, T).mean(dim=(0, 2))
    s2_v = k_between.reshape(V, N, -1).mean(dim=(1, 2))
    w = mask.to(samples.dtype)
    s1 = (s1_vt * w).sum() / n_pairs
    s2 = (s2_v * w.sum(dim=1)).sum() / n_pairs
    return lam * s1 + (1.0 - lam) * s2, s1, s2


def kernel_score(samples: torch.Tensor, target: torch.Tensor, gamma: float = 1.0, lam: float = 0.5) -> torch.Tensor:
    """ProSMin's kernel score (paper Eq. 5/6) with a Gaussian kernel, unbiased in r samples; lower is better.

    Args:
        samples: [r, N, D]; target: [N, D]; gamma: kernel bandwidth; lam: weight of the sample-target term.

    Returns:
        A 0-d tensor: mean_i [ lam (-(2 / r) sum_j k(z_ij, y_i)) + (1 - lam) (1 / (r (r - 1)))
        sum_{j != k} k(z_ij, z_ik) ] with k(a, b) = exp(-||a - b||^2 / (2 gamma^2)).
    """
    _check(samples, target, lam, multiview=False)
    loss, _, _ = multiview_kernel_score(samples[None], target[None], gamma=gamma, lam=lam)
    return loss
