"""Which tokens M2PO constrains, and how: trust-region selection, the second-moment keep-mask
(paper, Algorithm 1) and the authors' released clip bound.

Plain PyTorch, no verl import. Every function works on padded `(batch, response_len)` tensors
(any shape, in fact: the "batch" is every element handed in). The mask and the clip bound take
one sort and one cumulative sum over the tokens that can be constrained, with no Python loop
over tokens and a single host synchronisation per call (to size that sort).

Conventions:
- `log_ratio` is `log pi_theta - log pi_behav` per token (`d_i`); the second moment of a token is
  `d_i ** 2` (`m_i`).
- Sums of second moments are accumulated in float64: a batch can hold millions of tokens, and
  the stopping rule compares a running mean with `tau` exactly.
- Ties in `m_i` are broken by position: among equal values, the token with the larger flat
  index is removed first. Algorithm 1 leaves the order open; this rule makes the mask
  deterministic.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "trust_region_mask",
    "second_moment_keep_mask",
    "second_moment_clip_bound",
    "check_m2_threshold",
]


def check_m2_threshold(m2_threshold: float, key: str = "m2_threshold") -> float:
    """Validate tau: a positive number (``math.inf`` allowed and means "never mask").

    Raises:
        ValueError: naming ``key`` when tau is not a number, NaN, zero or negative.
    """
    if isinstance(m2_threshold, bool) or not isinstance(m2_threshold, (int, float)):
        raise ValueError(f"{key} must be a positive number (paper default 0.04), got {m2_threshold!r}")
    if math.isnan(m2_threshold) or m2_threshold <= 0:
        raise ValueError(
            f"{key} must be > 0 (paper default 0.04; inf disables masking), got {m2_threshold!r}"
        )
    return float(m2_threshold)


def trust_region_mask(
    log_ratio: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Tokens that a trust region could act on: `(A > 0 and r > 1) or (A < 0 and r < 1)`.

    These are the tokens PPO clipping can bind on, and the only candidates M2PO may mask.

    Args:
        log_ratio: `(batch, response_len)` `log pi_theta - log pi_behav`.
        advantages: `(batch, response_len)`.
        response_mask: `(batch, response_len)` bool, True on valid response tokens.

    Returns:
        `(batch, response_len)` bool.
    """
    # sign(A) * sign(d) > 0 is exactly "same strict sign" (a float product could underflow).
    same_sign = (torch.sign(advantages) * torch.sign(log_ratio)) > 0
    return response_mask & same_sign


def _split_candidates(log_ratio: torch.Tensor, candidates: torch.Tensor, tau: float):
    """Split candidates into those that can never be constrained and the few that can.

    A candidate with `d**2 <= tau` is never masked: all such candidates together already have
    a mean `<= tau`, so Algorithm 1 stops before reaching any of them (and for the same reason
    the clip cap `c` satisfies `c >= tau`). Only the "high" candidates (`d**2 > tau`) are sorted,
    which in practice is a small fraction of the batch.

    Returns `(high_index_sorted, high_moment_sorted, low_count, low_sum)`: flat indices of the
    high candidates ordered by ascending `d**2` (stable: among ties the smaller index first, so
    the larger index is dropped first), their float64 second moments, and the count and float64
    sum of the low candidates. Costs one host synchronisation (sizing the high set).
    """
    second_moment = log_ratio.detach().reshape(-1).double().square()
    flat_candidates = candidates.reshape(-1)
    high = flat_candidates & (second_moment > tau)
    low = flat_candidates & ~high
    low_count = low.sum()
    low_sum = torch.where(low, second_moment, 0.0).sum()
    high_index = high.nonzero().squeeze(1)
    high_moment_sorted, order = torch.sort(second_moment[high_index], stable=True)
    return high_index[order], high_moment_sorted, low_count, low_sum


def second_moment_keep_mask(
    log_ratio: torch.Tensor, candidates: torch.Tensor, m2_threshold: float
) -> torch.Tensor:
    """M2PO keep-mask (Algorithm 1) in closed form.

    Algorithm 1 repeatedly drops the candidate with the largest `d**2` until the mean of `d**2`
    over the candidates that remain is `<= m2_threshold`. Since dropping the largest element
    never raises the mean, the result keeps the `c` smallest candidates for the largest `c`
    whose mean is `<= tau` (`c = 0` when even the smallest exceeds it): one ascending sort and
    one cumulative sum, over the candidates with `d**2 > tau` only (see `_split_candidates`).

    Args:
        log_ratio: `(batch, response_len)` `log pi_theta - log pi_behav`; not differentiated.
        candidates: `(batch, response_len)` bool, the tokens that may be masked (the trust
            region, see `trust_region_mask`). Others are always kept.
        m2_threshold: tau > 0; `math.inf` keeps everything.

    Returns:
        `(batch, response_len)` bool, False exactly on the masked tokens.
    """
    tau = check_m2_threshold(m2_threshold)
    high_index, high_moment, low_count, low_sum = _split_candidates(log_ratio, candidates, tau)
    num_high = high_index.numel()
    keep = torch.ones(log_ratio.numel(), dtype=torch.bool, device=log_ratio.device)
    if num_high == 0:
        return keep.reshape(log_ratio.shape)
    high_kept = torch.arange(1, num_high + 1, device=log_ratio.device)
    mean_if_kept = (low_sum + torch.cumsum(high_moment, dim=0)) / (low_count + high_kept)
    num_high_kept = (high_kept * (mean_if_kept <= tau)).max()
    keep[high_index] = high_kept <= num_high_kept
    return keep.reshape(log_ratio.shape)


def second_moment_clip_bound(
    log_ratio: torch.Tensor, candidates: torch.Tensor, m2_threshold: float
) -> torch.Tensor:
    """The authors' released variant: the cap on `|d|` whose capped second moment meets tau.

    Finds `c >= 0` with `mean over candidates of min(d**2, c) == tau` and returns `sqrt(c)`, the
    bound that the released code turns into a PPO clip range `[exp(-cap), exp(cap)]`. When the
    uncapped mean is already `<= tau` (or there is no candidate) nothing is clipped and the
    result is `+inf`.

    `f(c) = mean(min(m, c))` is piecewise linear and increasing; on sorted candidates
    `m_(0) <= ... <= m_(n-1)` the cap lies above the first `J` values, where `J` counts the
    `j` with `f(m_(j)) <= tau`, and then `c = (tau * n - sum_{j<J} m_(j)) / (n - J)`. Candidates
    with `m <= tau` always count in `J` (`f(tau) <= tau`), so only the others are sorted.

    Args:
        log_ratio: `(batch, response_len)`; not differentiated.
        candidates: `(batch, response_len)` bool.
        m2_threshold: tau > 0.

    Returns:
        0-dim float64 tensor: the cap on `|log r|` (`inf` when inactive).
    """
    tau = check_m2_threshold(m2_threshold)
    high_index, high_moment, low_count, low_sum = _split_candidates(log_ratio, candidates, tau)
    num_high = high_index.numel()
    if num_high == 0:
        return torch.tensor(math.inf, dtype=torch.float64, device=log_ratio.device)
    num_candidates = (low_count + num_high).double()  # tau * int tensor would be float32
    rank = torch.arange(num_high, device=log_ratio.device)
    prefix_sum_exclusive = low_sum + torch.cumsum(high_moment, dim=0) - high_moment
    # n * f(m_(j)): everything below m_(j) in full, m_(j) itself for it and all above it.
    capped_total = prefix_sum_exclusive + high_moment * (num_high - rank)
    num_fully_below = (capped_total <= tau * num_candidates).sum()
    sum_fully_below = low_sum + torch.where(rank < num_fully_below, high_moment, 0.0).sum()
    num_capped = num_high - num_fully_below
    cap_squared = torch.where(
        num_capped > 0, (tau * num_candidates - sum_fully_below) / num_capped.clamp(min=1), math.inf
    )
    return cap_squared.clamp(min=0).sqrt()
