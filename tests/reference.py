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


def areal_keep_mask(staleness_log_ratio: torch.Tensor, response_mask: torch.Tensor, tau: float) -> torch.Tensor:
    """AReaL's `m2_threshold` rule as its code behaves (written from its semantics, not its code):
    over every valid token, sorted by `d**2` descending, mask the shortest prefix after which the
    mean of the rest is strictly below tau; if no prefix gets there, keep only the last (smallest)
    token. Exact arithmetic; ties broken like the package (larger flat index masked first)."""
    moments = second_moments(staleness_log_ratio)
    valid = [i for i, v in enumerate(response_mask.reshape(-1).tolist()) if v]
    order = sorted(valid, key=lambda i: (-moments[i], -i))
    keep = [True] * len(moments)
    for masked in range(len(order)):
        rest = order[masked:]
        if sum((Fraction(moments[i]) for i in rest), Fraction(0)) / len(rest) < Fraction(tau):
            break
    else:
        masked = len(order) - 1
    for i in order[:masked]:
        keep[i] = False
    return torch.tensor(keep, dtype=torch.bool).reshape(staleness_log_ratio.shape)


def decoupled_token_losses(
    log_probs: torch.Tensor,
    proximal_log_probs: torch.Tensor,
    staleness_log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    tau: float,
    clip_low: float,
    clip_high: float,
    clip_c: float | None,
    behaviour_weight_cap: float | None = None,
) -> torch.Tensor:
    """AReaL's decoupled M2PO, token by token: the Algorithm 1 mask (above) over every valid token
    of `d = log pi_prox - log pi_behav`, then `exp(d) * max(-A r, -A clip(r))` with
    `r = pi_theta / pi_prox` (dual clip `min(., -A c)` for `A < 0`), 0 where masked, padding, or
    `exp(d)` above `behaviour_weight_cap` (AReaL's behav_imp_weight_cap). With tau = inf: AReaL's
    decoupled PPO. Differentiable in `log_probs` (built from per-token scalar ops)."""
    keep = algorithm1_keep_mask(torch.where(response_mask, staleness_log_ratio, 0.0), response_mask, tau)
    flat_lp = log_probs.reshape(-1)
    flat = zip(
        proximal_log_probs.reshape(-1).tolist(),
        staleness_log_ratio.reshape(-1).tolist(),
        advantages.reshape(-1).tolist(),
        response_mask.reshape(-1).tolist(),
        keep.reshape(-1).tolist(),
    )
    out = []
    for i, (prox, d, a, valid, kept) in enumerate(flat):
        if not (valid and kept) or (behaviour_weight_cap is not None and math.exp(d) > behaviour_weight_cap):
            out.append(flat_lp[i] * 0.0)
            continue
        ratio = torch.exp(flat_lp[i] - prox)
        clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        loss = torch.maximum(-a * ratio, -a * clipped)
        if clip_c is not None and a < 0:
            loss = torch.minimum(loss, torch.tensor(-a * clip_c, dtype=ratio.dtype))
        out.append(math.exp(d) * loss)
    return torch.stack(out).reshape(log_probs.shape)


class ReleasedSolverError(ArithmeticError):
    """The released solver's failure mode: a kept second moment below its 1e-12 offset makes the
    cap the square root of a negative number."""


def released_clip_ratio_bounds(
    log_ratio: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, tau: float
) -> tuple[float, float, float]:
    """The authors' released M2PO clip (github.com/Infini-AI-Lab/M2PO, verl/trainer/ppo/core_algos.py,
    `kpo_clip_harmful_tokens` and `_solve_tau_from_sorted_delta2`, as the released scripts call it:
    no `miniclip_*`), re-implemented here from its behaviour to document where ours differs:

    - trust region: the sign of each row's advantage is read from its first token (|A| > 1e-12),
      and `r > 1` / `r < 1` are decided as `exp(d) > 1 + 1e-12` / `< 1 - 1e-12` in the input dtype;
    - no trust-region token, or a mean `d**2` <= tau + 1e-12: ratio bounds `[0, 1e5]`;
    - otherwise, on the sorted `m = d**2`, the first `k` with `(m_k - 1e-12) (n - k - 1) + sum_{j<=k} m_j
      >= tau n - 1e-12` gives the cap `0` if `k == 0`, else `sqrt(m_(k-1) - 1e-12)`: a data point just
      below the exact solution.

    Returns (lower ratio bound, upper ratio bound, cap on |d|; inf for the `[0, 1e5]` case)."""
    first_advantage = advantages[:, 0].tolist()
    ratio = torch.exp(log_ratio)  # input dtype
    moments = []
    for row, a in enumerate(first_advantage):
        for col in range(log_ratio.shape[1]):
            if not bool(response_mask[row, col]):
                continue
            r = ratio[row, col]
            harmful = (a > 1e-12 and bool(r > 1.0 + 1e-12)) or (a < -1e-12 and bool(r < 1.0 - 1e-12))
            if harmful:
                moments.append(float(log_ratio[row, col].square()))
    placeholder = (0.0, 100000.0, math.inf)
    if not moments or sum(moments) / len(moments) <= tau + 1e-12:
        return placeholder
    moments.sort()
    n, target = len(moments), tau * len(moments)
    prefix = 0.0
    for k, m in enumerate(moments):
        prefix += m
        if (m - 1e-12) * (n - k - 1) + prefix >= target - 1e-12:
            if k == 0:
                cap = 0.0
            else:
                squared = moments[k - 1] - 1e-12
                if squared < 0:
                    raise ReleasedSolverError(f"sqrt of {squared}")
                cap = math.sqrt(squared)
            # float32 bounds, as released
            return torch.exp(torch.tensor(-cap)).item(), torch.exp(torch.tensor(cap)).item(), cap
    return placeholder
