"""Invariants of the M2PO mask and clip bound, checked with hypothesis on arbitrary inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from m2po.algorithm import second_moment_clip_bound, second_moment_keep_mask
from tests.reference import second_moments

log_ratios = st.floats(min_value=-12, max_value=12, allow_nan=False, width=32)
taus = st.floats(min_value=1e-4, max_value=4.0, allow_nan=False)


@st.composite
def token_batches(draw, min_size=1, max_size=64, unique=False):
    values = draw(st.lists(log_ratios, min_size=min_size, max_size=max_size, unique=unique))
    candidates = draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    return torch.tensor(values, dtype=torch.float32), torch.tensor(candidates, dtype=torch.bool)


def _exact_mean(moments, indices):
    return sum((Fraction(moments[i]) for i in indices), Fraction(0)) / len(indices)


@given(token_batches(), taus)
def test_m2_after_masking_is_within_budget(batch, tau):
    log_ratio, candidates = batch
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    moments = second_moments(log_ratio)
    kept = [i for i in range(len(moments)) if candidates[i] and keep[i]]
    if kept:
        assert _exact_mean(moments, kept) <= Fraction(tau)


@given(token_batches(), taus)
def test_mask_is_minimal(batch, tau):
    """Un-masking the smallest masked token breaks the bound."""
    log_ratio, candidates = batch
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    masked = [i for i in range(len(keep)) if not keep[i]]
    assume(masked)
    moments = second_moments(log_ratio)
    smallest = min(masked, key=lambda i: (moments[i], -i))
    kept = [i for i in range(len(keep)) if candidates[i] and keep[i]] + [smallest]
    assert _exact_mean(moments, kept) > Fraction(tau)


@given(token_batches(), taus)
def test_tokens_outside_candidates_are_never_masked(batch, tau):
    log_ratio, candidates = batch
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    assert keep[~candidates].all()


@given(token_batches(unique=True), taus, st.randoms(use_true_random=False))
def test_permutation_equivariance(batch, tau, rng):
    log_ratio, candidates = batch
    perm = list(range(len(log_ratio)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    keep_permuted = second_moment_keep_mask(log_ratio[perm], candidates[perm], tau)
    # Values may repeat in |d| (0.5 and -0.5): compare what is masked, not where, then.
    moments = torch.tensor(second_moments(log_ratio), dtype=torch.float64)
    assert sorted(moments[~keep].tolist()) == sorted(moments[perm][~keep_permuted].tolist())
    if len(set(log_ratio.abs().tolist())) == len(log_ratio):
        assert torch.equal(keep[perm], keep_permuted)
    cap = second_moment_clip_bound(log_ratio, candidates, tau)
    cap_permuted = second_moment_clip_bound(log_ratio[perm], candidates[perm], tau)
    assert math.isclose(float(cap), float(cap_permuted), rel_tol=1e-12) or float(cap) == float(cap_permuted)


@given(token_batches(), taus, taus)
def test_masked_set_shrinks_as_tau_grows(batch, tau_a, tau_b):
    log_ratio, candidates = batch
    low, high = sorted((tau_a, tau_b))
    masked_at_low = ~second_moment_keep_mask(log_ratio, candidates, low)
    masked_at_high = ~second_moment_keep_mask(log_ratio, candidates, high)
    assert not (masked_at_high & ~masked_at_low).any()  # subset, hence monotone fraction
    cap_low = float(second_moment_clip_bound(log_ratio, candidates, low))
    cap_high = float(second_moment_clip_bound(log_ratio, candidates, high))
    assert cap_high >= cap_low * (1 - 1e-12)


@given(token_batches())
def test_infinite_tau_masks_nothing(batch):
    log_ratio, candidates = batch
    assert second_moment_keep_mask(log_ratio, candidates, math.inf).all()
    assert math.isinf(float(second_moment_clip_bound(log_ratio, candidates, math.inf)))


@given(token_batches(), taus)
def test_clip_meets_budget_and_clips_at_least_as_many_as_mask(batch, tau):
    log_ratio, candidates = batch
    cap = float(second_moment_clip_bound(log_ratio, candidates, tau))
    moments = [m for m, c in zip(second_moments(log_ratio), candidates.tolist()) if c]
    if math.isinf(cap):
        assert not moments or math.fsum(moments) / len(moments) <= tau * (1 + 1e-12)
        return
    capped_mean = math.fsum(min(m, cap * cap) for m in moments) / len(moments)
    assert math.isclose(capped_mean, tau, rel_tol=1e-9)
    num_clipped = sum(m > cap * cap for m in moments)
    num_masked = int((~second_moment_keep_mask(log_ratio, candidates, tau)).sum())
    assert num_clipped >= num_masked


@given(token_batches(max_size=96), taus, st.integers(min_value=2, max_value=5))
def test_refined_window_equals_the_unrefined_result(batch, tau, buckets):
    """Narrowing the window by bucketed sums (forced here at every size) never changes the mask or
    the cap: the same result as sorting every candidate above tau."""
    from m2po.algorithm import masking

    log_ratio, candidates = batch
    settings = {"_SORT_AT_MOST": 0, "_REFINE_BUCKETS": buckets, "_MAX_REFINEMENTS": 8}
    no_refinement = {"_SORT_AT_MOST": 10**9, "_SPLIT_MULTIPLES": [1.0]}
    results = []
    for patch in (settings, no_refinement):
        saved = {name: getattr(masking, name) for name in patch}
        try:
            for name, value in patch.items():
                setattr(masking, name, value)
            results.append(
                (second_moment_keep_mask(log_ratio, candidates, tau), second_moment_clip_bound(log_ratio, candidates, tau))
            )
        finally:
            for name, value in saved.items():
                setattr(masking, name, value)
    (keep_a, cap_a), (keep_b, cap_b) = results
    assert torch.equal(keep_a, keep_b)
    assert float(cap_a) == float(cap_b) or math.isclose(float(cap_a), float(cap_b), rel_tol=1e-12)
