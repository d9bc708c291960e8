"""Our `clip` variant against the authors' released loss (tests/reference.py re-implements its
behaviour): what matches, and a test for every way it differs (docs/losses.md lists them)."""

from __future__ import annotations

import math

import pytest
import torch

from m2po.algorithm import m2po_token_losses, second_moment_clip_bound, trust_region_mask
from tests.reference import ReleasedSolverError, authors_clip_cap, released_clip_ratio_bounds

TAU = 0.04


def grpo_batch(seed: int, batch: int = 16, length: int = 64, scale: float = 0.3):
    """Float32 GRPO-style data: one nonzero advantage per row, stale-looking log-ratios."""
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(batch, length, generator=g) - 0.5
    log_probs = behaviour + scale * torch.randn(batch, length, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    mask = torch.arange(length)[None] < torch.randint(8, length + 1, (batch,), generator=g)[:, None]
    return log_probs, behaviour, advantages, mask


def released_token_losses(log_probs, behaviour, advantages, mask, low, high):
    ratio = (log_probs - behaviour).exp()
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(low, high)
    return torch.where(mask, torch.maximum(unclipped, clipped), 0.0), mask & (clipped > unclipped)


@pytest.mark.parametrize("seed", range(40))
def test_same_gradient_and_clipped_tokens_on_grpo_style_data(seed):
    """What matches: on float32 GRPO-style batches the released code clips exactly our tokens and
    gives exactly our gradient, although it reports a smaller cap (next test)."""
    log_probs, behaviour, advantages, mask = grpo_batch(seed)
    ours_lp = log_probs.clone().requires_grad_()
    ours = m2po_token_losses(ours_lp, behaviour, advantages, mask, TAU, variant="clip")
    ours.token_losses.sum().backward()

    low, high, _ = released_clip_ratio_bounds(log_probs - behaviour, advantages, mask, TAU)
    released_lp = log_probs.clone().requires_grad_()
    released, released_clipped = released_token_losses(released_lp, behaviour, advantages, mask, low, high)
    released.sum().backward()

    assert torch.equal(mask & ~ours.keep_mask, released_clipped)
    assert torch.equal(ours_lp.grad, released_lp.grad)


@pytest.mark.parametrize("seed", range(10))
def test_difference_the_released_cap_snaps_down_to_a_data_point(seed):
    """Ours solves mean(min(d**2, c**2)) = tau exactly; the released solver returns the data point
    just below the solution (minus 1e-12), so its reported cap, M2 after and loss value differ."""
    log_probs, behaviour, advantages, mask = grpo_batch(seed)
    log_ratio = log_probs - behaviour
    candidates = trust_region_mask(log_ratio, advantages, mask)
    ours = float(second_moment_clip_bound(log_ratio, candidates, TAU))
    _, _, released = released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)
    assert ours == pytest.approx(authors_clip_cap(log_ratio, candidates, TAU), rel=1e-9)  # exact
    assert released < ours
    moments = sorted(float(m) for m in log_ratio[candidates].square())  # float32 squares, as released
    below = [m for m in moments if m <= ours**2]
    assert released == pytest.approx(math.sqrt(below[-1] - 1e-12), rel=1e-12)  # the data point below


def test_difference_all_trust_region_tokens_above_tau_snap_the_cap_to_zero():
    # Every trust-region token has d**2 > tau: the released cap is 0 (all ratios clipped to 1); the
    # exact cap is sqrt(tau), where the capped mean is tau. Both remove every gradient.
    log_ratio = torch.tensor([[0.3, 0.5, 0.4]])
    advantages, mask = torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)
    _, _, released = released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)
    ours = float(second_moment_clip_bound(log_ratio, trust_region_mask(log_ratio, advantages, mask), TAU))
    assert released == 0.0
    assert ours == pytest.approx(math.sqrt(TAU), rel=1e-12)
    out = m2po_token_losses(log_ratio.clone().requires_grad_(), torch.zeros(1, 3), advantages, mask, TAU, "clip")
    assert not out.keep_mask.any()


def test_difference_nothing_to_clip_means_no_bound_not_a_placeholder():
    # M2 <= tau: ours leaves every ratio unclipped (cap inf); the released code clips ratios at the
    # placeholder bounds [0, 1e5], which binds on a rare huge ratio (d = 12: r = 1.6e5).
    length = 4000
    log_ratio = torch.full((1, length + 1), 1e-3)
    log_ratio[0, -1] = 12.0  # m = 144; mean (144 + 4000e-6) / 4001 = 0.036 <= tau
    advantages, mask = torch.ones(1, length + 1), torch.ones(1, length + 1, dtype=torch.bool)
    low, high, released = released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)
    assert (low, high, released) == (0.0, 1e5, math.inf)
    log_probs = log_ratio.clone().requires_grad_()
    ours = m2po_token_losses(log_probs, torch.zeros_like(log_ratio), advantages, mask, TAU, "clip")
    ours.token_losses.sum().backward()
    assert math.isinf(float(second_moment_clip_bound(log_ratio, mask, TAU))) and ours.keep_mask.all()
    assert log_probs.grad[0, -1] == pytest.approx(-math.exp(12.0), rel=1e-5)  # released: 0 (clipped at 1e5)


def test_difference_ratio_above_one_is_decided_exactly():
    # d = 1e-8 > 0 with A > 0 is a trust-region token; in float32 exp(1e-8) == 1.0, so the released
    # test `exp(d) > 1 + 1e-12` leaves it out (and out of M2).
    log_ratio = torch.tensor([[1e-8, 0.5]])
    advantages, mask = torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    assert torch.exp(log_ratio[0, 0]).item() == 1.0
    assert trust_region_mask(log_ratio, advantages, mask).tolist() == [[True, True]]
    # Released: only the 0.5 token counts, M2 = 0.25 > tau, and the cap snaps to 0 (k = 0).
    assert released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)[2] == 0.0
    # Ours: two candidates, cap c with (1e-16 + c**2) / 2 = tau.
    ours = float(second_moment_clip_bound(log_ratio, trust_region_mask(log_ratio, advantages, mask), TAU))
    assert ours == pytest.approx(math.sqrt(2 * TAU), rel=1e-9)


def test_difference_advantage_sign_per_token_not_per_row():
    # Per-token advantages (e.g. verl's token-level estimators): the released code reads each row's
    # sign from its first token, so the second token (A < 0, r < 1) is not in its trust region.
    log_ratio = torch.tensor([[0.5, -0.5]])
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    assert trust_region_mask(log_ratio, advantages, mask).tolist() == [[True, True]]
    # Released: only the first token counts (0.25 > tau), and the cap snaps to 0 (k = 0).
    assert released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)[2] == 0.0
    # Ours: both count, both above tau, so the exact cap is sqrt(tau).
    ours = float(second_moment_clip_bound(log_ratio, trust_region_mask(log_ratio, advantages, mask), TAU))
    assert ours == pytest.approx(math.sqrt(TAU), rel=1e-12)


def test_difference_tiny_kept_moments_do_not_crash():
    # The released solver takes sqrt(m - 1e-12) of the largest kept second moment: below 1e-12 it
    # is the square root of a negative number and the step fails. Ours returns the exact cap.
    log_ratio = torch.tensor([[1e-7] * 50 + [1.1, 1.2]], dtype=torch.float64)  # M2 = 2.65 / 52 > tau
    advantages, mask = torch.ones_like(log_ratio), torch.ones_like(log_ratio, dtype=torch.bool)
    with pytest.raises(ReleasedSolverError):
        released_clip_ratio_bounds(log_ratio, advantages, mask, TAU)
    candidates = trust_region_mask(log_ratio, advantages, mask)
    ours = float(second_moment_clip_bound(log_ratio, candidates, TAU))
    assert ours == pytest.approx(authors_clip_cap(log_ratio, candidates, TAU), rel=1e-9)
    # The 50 tiny ones are below the cap, the two others at it: (50e-14 + 2 c**2) / 52 = tau.
    assert ours == pytest.approx(math.sqrt((TAU * 52 - 50 * 1e-14) / 2), rel=1e-9)
