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
    "PAPER_M2_THRESHOLD",
    "trust_region_mask",
    "second_moment_keep_mask",
    "second_moment_clip_bound",
    "check_m2_threshold",
]


# tau of every run in the paper (and of AReaL's M2PO recipe); the one default everywhere in the package.
PAPER_M2_THRESHOLD = 0.04


def check_m2_threshold(m2_threshold: float, key: str = "m2_threshold") -> float:
    """Validate tau: a positive number (``math.inf`` allowed and means "never mask").

    Raises:
        ValueError: naming ``key`` when tau is not a number, NaN, zero or negative.
    """
    if isinstance(m2_threshold, bool) or not isinstance(m2_threshold, (int, float)):
        raise ValueError(f"{key} must be a positive number (paper default {PAPER_M2_THRESHOLD}), got {m2_threshold!r}")
    if math.isnan(m2_threshold) or m2_threshold <= 0:
        raise ValueError(
            f"{key} must be > 0 (paper default {PAPER_M2_THRESHOLD}; inf disables masking), got {m2_threshold!r}"
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


# Candidate split thresholds, as multiples of tau: T_k = tau * 2**k.
_SPLIT_MULTIPLES = [2.0**k for k in range(16)]


def _split_candidates(log_ratio: torch.Tensor, candidates: torch.Tensor, tau: float, rule: str):
    """Split candidates into the many that can never be constrained and the few that can.

    Sorting is the expensive step, so only candidates above a safe threshold `T` are sorted:
    - "mask": the candidates with `d**2 <= T` form a prefix of the ascending order; if their
      mean is `<= tau`, Algorithm 1 stops before reaching any of them.
    - "clip": if `mean(min(d**2, T)) <= tau`, the cap `c` satisfies `c >= T`, so none of them
      is capped.
    `T = tau` always qualifies (for "mask" because each of those has `d**2 <= tau`; for "clip"
    because `min(m, tau) <= tau`). Candidates above `tau` are then bucketed to find the largest
    qualifying `tau * 2**k` (with a 1e-9 relative safety margin, so rounding can only make the
    split smaller).

    Returns `(high_index_sorted, high_moment_sorted, low_count, low_sum)`: flat indices of the
    candidates above `T` ordered by ascending `d**2` (stable: among ties the smaller index first,
    so the larger index is dropped first), their float64 second moments, and the count and
    float64 sum over the candidates at or below `T`. Two host synchronisations (sizing the subsets).
    """
    abs_log_ratio = log_ratio.detach().reshape(-1).abs()
    flat_candidates = candidates.reshape(-1)
    device = log_ratio.device
    # Level 1, over all tokens, in the input dtype: T = tau always qualifies, so only candidates
    # with d**2 > tau go further (the margin makes this a superset despite rounding of sqrt).
    above_tau = flat_candidates & (abs_log_ratio > math.sqrt(tau) * (1 - 1e-6))
    sub_index = above_tau.nonzero().squeeze(1)
    below_abs = torch.where(flat_candidates & ~above_tau, abs_log_ratio, 0.0).double()
    below_sum = torch.dot(below_abs, below_abs)  # float64 squares of float32/bf16 values are exact
    below_count = (flat_candidates.sum() - sub_index.numel()).double()
    if sub_index.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return sub_index, empty, below_count, below_sum

    # Level 2, over that subset: the largest qualifying T among tau * 2**k.
    sub_abs = abs_log_ratio[sub_index]
    sub_moment = sub_abs.double().square()
    thresholds = torch.tensor(_SPLIT_MULTIPLES, dtype=torch.float64, device=device) * tau
    bucket = torch.bucketize(sub_moment, thresholds)  # bucket k <=> T_(k-1) < m <= T_k
    num_thresholds = len(_SPLIT_MULTIPLES)
    count_at_or_below = below_count + torch.bincount(bucket, minlength=num_thresholds + 1)[:-1].cumsum(0)
    sum_at_or_below = below_sum + torch.bincount(bucket, weights=sub_moment, minlength=num_thresholds + 1)[:-1].cumsum(0)
    margin = 1 - 1e-9
    if rule == "mask":
        safe = sum_at_or_below <= tau * count_at_or_below * margin
    else:
        count_all = below_count + sub_index.numel()
        safe = sum_at_or_below + thresholds * (count_all - count_at_or_below) <= tau * count_all * margin
    safe[0] = True  # T = tau: exact argument above, no rounding involved
    split = (torch.arange(num_thresholds, device=device) * safe).max()
    high = sub_moment > thresholds[split]
    high_index, high_abs = sub_index[high], sub_abs[high]
    _, order = torch.sort(high_abs, stable=True)  # |d| orders d**2 exactly; stable keeps index order
    return high_index[order], sub_moment[high][order], count_at_or_below[split], sum_at_or_below[split]


def second_moment_keep_mask(
    log_ratio: torch.Tensor, candidates: torch.Tensor, m2_threshold: float
) -> torch.Tensor:
    """M2PO keep-mask (Algorithm 1) in closed form.

    Algorithm 1 repeatedly drops the candidate with the largest `d**2` until the mean of `d**2`
    over the candidates that remain is `<= m2_threshold`. Since dropping the largest element
    never raises the mean, the result keeps the `c` smallest candidates for the largest `c`
    whose mean is `<= tau` (`c = 0` when even the smallest exceeds it): one ascending sort and
    one cumulative sum, over the few candidates that can be masked (see `_split_candidates`).

    Args:
        log_ratio: `(batch, response_len)` `log pi_theta - log pi_behav`; not differentiated.
        candidates: `(batch, response_len)` bool, the tokens that may be masked (the trust
            region, see `trust_region_mask`). Others are always kept.
        m2_threshold: tau > 0; `math.inf` keeps everything.

    Returns:
        `(batch, response_len)` bool, False exactly on the masked tokens.
    """
    tau = check_m2_threshold(m2_threshold)
    keep = torch.ones(log_ratio.numel(), dtype=torch.bool, device=log_ratio.device)
    if math.isinf(tau):
        return keep.reshape(log_ratio.shape)
    high_index, high_moment, low_count, low_sum = _split_candidates(log_ratio, candidates, tau, "mask")
    num_high = high_index.numel()
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
    `j` with `f(m_(j)) <= tau`, and then `c = (tau * n - sum_{j<J} m_(j)) / (n - J)`. Only the
    candidates that can be capped are sorted (see `_split_candidates`).

    Args:
        log_ratio: `(batch, response_len)`; not differentiated.
        candidates: `(batch, response_len)` bool.
        m2_threshold: tau > 0.

    Returns:
        0-dim float64 tensor: the cap on `|log r|` (`inf` when inactive).
    """
    tau = check_m2_threshold(m2_threshold)
    no_cap = torch.tensor(math.inf, dtype=torch.float64, device=log_ratio.device)
    if math.isinf(tau):
        return no_cap
    high_index, high_moment, low_count, low_sum = _split_candidates(log_ratio, candidates, tau, "clip")
    num_high = high_index.numel()
    if num_high == 0:
        return no_cap
    num_candidates = low_count + num_high
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
