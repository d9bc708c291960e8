"""Which tokens M2PO constrains, and how: trust-region selection, the second-moment keep-mask
(paper, Algorithm 1) and the authors' released clip bound.

Plain PyTorch, no verl import. Every function works on padded `(batch, response_len)` tensors
(any shape, in fact: the "batch" is every element handed in). The mask and the clip bound take
bucketed sums that narrow the tokens that can be constrained to a small window around the cut,
then one sort and one cumulative sum over that window: no Python loop over tokens, and a few host
synchronisations per call (to size each window).

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
from dataclasses import dataclass

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


# Level-2 thresholds, as multiples of tau: T_k = tau * 2**(k/4), 4 per octave over 16 octaves (a
# heavy tail spans many octaves; near the cut, a bucket is 19% wide, so what is left to sort is
# small). Measured on 2 CPU cores, 1 to 16 per octave cost the same within 0.1 ms at 64k tokens.
_THRESHOLDS_PER_OCTAVE = 4
_SPLIT_MULTIPLES = [2.0 ** (k / _THRESHOLDS_PER_OCTAVE) for k in range(16 * _THRESHOLDS_PER_OCTAVE)]
# Refinement: while more than _SORT_AT_MOST candidates lie between the last threshold known to be
# below the cut and the first known to be above it, split that window into _REFINE_BUCKETS equal
# parts (at most _MAX_REFINEMENTS times; tied values cannot be split and are sorted as they are).
_SORT_AT_MOST = 2048
_REFINE_BUCKETS = 128
_MAX_REFINEMENTS = 4
# Relative safety margin of the threshold tests: rounding can only widen the window that is sorted.
_MARGIN = 1e-9


@dataclass
class _Window:
    """The candidates whose fate needs a sort, and what is known of the others.

    index / moment: flat indices and float64 `d**2` of the candidates in the window `(lo, hi]`,
        in ascending `d**2` (stable: among ties the smaller index first, so the larger index is
        dropped first).
    low_count / low_sum: count and float64 sum of `d**2` over the candidates at or below `lo`
        (never masked or capped).
    above_index: flat indices of the candidates above `hi` (always masked, or always capped).
    """

    index: torch.Tensor
    moment: torch.Tensor
    low_count: torch.Tensor
    low_sum: torch.Tensor
    above_index: torch.Tensor


def _threshold_tests(sum_at_or_below, count_at_or_below, thresholds, count_all, tau, rule):
    """(safe, unsafe) per threshold T: the cut is surely at or above T / surely below T.

    - "mask": the mean over the candidates `<= T` is `<= tau` (Algorithm 1 keeps all of them, since
      the mean of an ascending prefix never decreases) / `> tau` (it masks every candidate `> T`).
    - "clip": `n * mean(min(d**2, T)) <= tau * n` (the cap is `>= T`) / `> tau * n` (the cap is `< T`).
    Both are monotone in T, so the safe thresholds are a prefix and the unsafe ones a suffix.
    """
    if rule == "mask":
        total, budget = sum_at_or_below, tau * count_at_or_below
    else:
        total, budget = sum_at_or_below + thresholds * (count_all - count_at_or_below), tau * count_all
    return total <= budget * (1 - _MARGIN), total > budget * (1 + _MARGIN)


def _split_candidates(log_ratio: torch.Tensor, candidates: torch.Tensor, tau: float, rule: str) -> _Window:
    """Narrow the candidates down to the few whose order decides the cut (rule "mask" or "clip").

    Sorting is the expensive step, so only the candidates in a window `(lo, hi]` around the cut
    are sorted:
    - Level 1, over all tokens: `lo = tau` is always safe (for "mask" because each candidate
      below has `d**2 <= tau`; for "clip" because `min(m, tau) <= tau`), so only candidates with
      `d**2 > tau` go further. Usually few are; far from tau this level is all the work.
    - Level 2, over those: bucket by `tau * 2**(k/4)`; `lo` = the largest safe threshold, `hi` = the
      smallest unsafe one (see `_threshold_tests`).
    - Refinement, while the window is large (data far above tau, where the cut sits inside the
      bulk): equal-width buckets between `lo` and `hi`, the same tests.
    Each level sums counts and `d**2` per bucket (bincount) instead of ordering anything; a level
    costs one or two host synchronisations (sizing the next window).
    """
    abs_log_ratio = log_ratio.detach().reshape(-1).abs()
    flat_candidates = candidates.reshape(-1)
    device = log_ratio.device
    no_index = torch.zeros(0, dtype=torch.long, device=device)
    # Level 1, in the input dtype (the margin makes "above" a superset despite rounding of sqrt).
    above_tau = flat_candidates & (abs_log_ratio > math.sqrt(tau) * (1 - 1e-6))
    sub_index = above_tau.nonzero().squeeze(1)
    below_abs = torch.where(flat_candidates & ~above_tau, abs_log_ratio, 0.0).double()
    low_sum = torch.dot(below_abs, below_abs)  # float64 squares of float32/bf16 values are exact
    low_count = (flat_candidates.sum() - sub_index.numel()).double()
    if sub_index.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return _Window(sub_index, empty, low_count, low_sum, no_index)
    count_all = low_count + sub_index.numel()
    sub_abs = abs_log_ratio[sub_index]
    sub_moment = sub_abs.double().square()

    above_parts = []
    lo, hi = tau, math.inf  # the window (lo, hi]
    for level in range(_MAX_REFINEMENTS + 1):
        if level == 0:
            host_thresholds = torch.tensor(_SPLIT_MULTIPLES, dtype=torch.float64) * tau
        elif math.isinf(hi) or sub_index.numel() <= _SORT_AT_MOST:
            break
        else:  # equal-width buckets over (lo, hi]; the last edge is hi itself
            host_thresholds = torch.linspace(lo, hi, _REFINE_BUCKETS + 1, dtype=torch.float64)[1:]
            host_thresholds[-1] = hi
        thresholds = host_thresholds.to(device)
        num_thresholds = thresholds.numel()
        bucket = torch.bucketize(sub_moment, thresholds)  # bucket k <=> T_(k-1) < m <= T_k
        count_at_or_below = low_count + torch.bincount(bucket, minlength=num_thresholds + 1)[:-1].cumsum(0)
        sum_at_or_below = low_sum + torch.bincount(bucket, weights=sub_moment, minlength=num_thresholds + 1)[
            :-1
        ].cumsum(0)
        safe, unsafe = _threshold_tests(sum_at_or_below, count_at_or_below, thresholds, count_all, tau, rule)
        if level == 0:
            safe[0] = True  # T = tau: exact argument above, no rounding involved
        positions = torch.arange(num_thresholds, device=device)
        # The last safe threshold (-1: none) and the first unsafe one (num_thresholds: none).
        lo_at, hi_at = torch.stack(
            [torch.where(safe, positions, -1).max(), torch.where(unsafe, positions, num_thresholds).min()]
        ).tolist()
        if lo_at >= 0:
            lo, low_count, low_sum = float(host_thresholds[lo_at]), count_at_or_below[lo_at], sum_at_or_below[lo_at]
        if hi_at < num_thresholds:
            hi = float(host_thresholds[hi_at])
            above_parts.append(sub_index[bucket > hi_at])
        selected = ((bucket > lo_at) & (bucket <= hi_at)).nonzero().squeeze(1)
        narrowed = selected.numel() < sub_index.numel()
        sub_index, sub_abs, sub_moment = sub_index[selected], sub_abs[selected], sub_moment[selected]
        if level > 0 and not narrowed:
            break  # tied values: no finer bucket separates them
    _, order = torch.sort(sub_abs, stable=True)  # |d| orders d**2 exactly; stable keeps index order
    above_index = torch.cat(above_parts) if above_parts else no_index
    return _Window(sub_index[order], sub_moment[order], low_count, low_sum, above_index)


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
    window = _split_candidates(log_ratio, candidates, tau, "mask")
    keep[window.above_index] = False
    num_window = window.index.numel()
    if num_window:
        window_kept = torch.arange(1, num_window + 1, device=log_ratio.device)
        mean_if_kept = (window.low_sum + torch.cumsum(window.moment, dim=0)) / (window.low_count + window_kept)
        num_window_kept = (window_kept * (mean_if_kept <= tau)).max()
        keep[window.index] = window_kept <= num_window_kept
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
    window = _split_candidates(log_ratio, candidates, tau, "clip")
    num_window, num_above = window.index.numel(), window.above_index.numel()
    if num_window + num_above == 0:
        return no_cap
    num_candidates = window.low_count + num_window + num_above
    rank = torch.arange(num_window, device=log_ratio.device)
    prefix_sum_exclusive = window.low_sum + torch.cumsum(window.moment, dim=0) - window.moment
    # n * f(m_(j)): everything below m_(j) in full, m_(j) itself for it and all above it.
    capped_total = prefix_sum_exclusive + window.moment * (num_window - rank + num_above)
    num_fully_below = (capped_total <= tau * num_candidates).sum()
    sum_fully_below = window.low_sum + torch.where(rank < num_fully_below, window.moment, 0.0).sum()
    num_capped = num_window + num_above - num_fully_below
    cap_squared = torch.where(
        num_capped > 0, (tau * num_candidates - sum_fully_below) / num_capped.clamp(min=1), math.inf
    )
    return cap_squared.clamp(min=0).sqrt()
