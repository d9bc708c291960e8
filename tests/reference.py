"""Literal, slow reference implementations that the closed forms are tested against.

Written from the paper's and the authors' descriptions, deliberately without the tricks used in
`m2po.algorithm` (no sort-and-cumsum, no low/high split): exact rational arithmetic, loops.
"""

from __future__ import annotations

import heapq
import math
from fractions import Fraction

import torch


def second_moments(log_ratio: torch.Tensor) -> list[float]:
    """`d**2` per element, in float64 (exact for float32 inputs)."""
    return [float(x) ** 2 for x in log_ratio.detach().reshape(-1).double().tolist()]


def algorithm1_keep_mask(log_ratio: torch.Tensor, candidates: torch.Tensor, tau: float) -> torch.Tensor:
    """Paper Algorithm 1, literally: while the mean of `d**2` over the candidates that remain
    exceeds tau, drop the remaining candidate with the largest `d**2` (among equal values the one
    with the larger flat index, the package's documented tie rule).

    The mean is kept exactly (Fractions); a heap finds the largest. Returns a bool keep-mask.
    """
    moments = second_moments(log_ratio)
    flat_candidates = candidates.reshape(-1).tolist()
    remaining = [i for i, is_candidate in enumerate(flat_candidates) if is_candidate]
    heap = [(-moments[i], -i) for i in remaining]
    heapq.heapify(heap)
    total = sum((Fraction(moments[i]) for i in remaining), Fraction(0))
    count = len(remaining)
    tau_exact = Fraction(tau) if math.isfinite(tau) else None
    keep = [True] * len(moments)
    while count > 0 and tau_exact is not None and total / count > tau_exact:
        _, neg_index = heapq.heappop(heap)
        index = -neg_index
        keep[index] = False
        total -= Fraction(moments[index])
        count -= 1
    return torch.tensor(keep, dtype=torch.bool).reshape(log_ratio.shape)


def authors_clip_cap(log_ratio: torch.Tensor, candidates: torch.Tensor, tau: float) -> float:
    """The released code's cap on |log r|: solve mean over candidates of min(d**2, c) == tau for c
    by bisection (f is continuous and increasing); inf when the uncapped mean is already <= tau."""
    moments = [m for m, c in zip(second_moments(log_ratio), candidates.reshape(-1).tolist()) if c]
    if not moments or math.fsum(moments) / len(moments) <= tau:
        return math.inf

    def capped_mean(c: float) -> float:
        return math.fsum(min(m, c) for m in moments) / len(moments)

    low, high = 0.0, max(moments)
    for _ in range(200):
        mid = (low + high) / 2
        if capped_mean(mid) < tau:
            low = mid
        else:
            high = mid
    return math.sqrt((low + high) / 2)


def ppo_clip_token_losses(log_ratio: torch.Tensor, advantages: torch.Tensor, cap: float) -> torch.Tensor:
    """Ordinary PPO clip `max(-A r, -A clip(r, exp(-cap), exp(cap)))`, as in the released code."""
    ratio = log_ratio.exp()
    clipped = ratio.clamp(math.exp(-cap), math.exp(cap)) if math.isfinite(cap) else ratio
    return torch.maximum(-advantages * ratio, -advantages * clipped)


def trust_region(log_ratio: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(A > 0 and r > 1) or (A < 0 and r < 1), element by element."""
    out = [
        bool(valid) and ((a > 0 and d > 0) or (a < 0 and d < 0))
        for d, a, valid in zip(
            log_ratio.reshape(-1).tolist(), advantages.reshape(-1).tolist(), response_mask.reshape(-1).tolist()
        )
    ]
    return torch.tensor(out, dtype=torch.bool).reshape(log_ratio.shape)
