"""The closed-form mask and clip bound against literal reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from m2po.algorithm import (
    m2po_token_losses,
    second_moment_clip_bound,
    second_moment_keep_mask,
    trust_region_mask,
)
from tests.reference import algorithm1_keep_mask, authors_clip_cap, ppo_clip_token_losses, trust_region


def _batch(kind: str, seed: int, batch: int = 8, length: int = 32):
    """(log_ratio, advantages, response_mask) of one of several shapes of data."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, length)
    if kind == "light":
        log_ratio = 0.15 * torch.randn(shape, generator=g)
    elif kind == "wide":
        log_ratio = 0.6 * torch.randn(shape, generator=g)
    elif kind == "heavy":  # Cauchy: a few huge ratios, like very stale rollouts
        u = torch.rand(shape, generator=g)
        log_ratio = (0.05 * torch.tan(math.pi * (u - 0.5))).clamp(-15, 15)
    elif kind == "ties":
        values = torch.tensor([-1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 0.125, -0.125])
        log_ratio = values[torch.randint(0, len(values), shape, generator=g)]
    elif kind == "equal":
        log_ratio = torch.full(shape, 0.3)
    else:
        raise ValueError(kind)
    advantages = torch.randn(batch, 1, generator=g).expand(shape).clone()
    advantages[torch.rand(batch, generator=g) < 0.2] = 0.0  # groups with no signal
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    response_mask = torch.arange(length)[None, :] < lengths[:, None]
    return log_ratio, advantages, response_mask


KINDS = ["light", "wide", "heavy", "ties", "equal"]
TAUS = [0.04, 0.01, 0.2, 1.0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", TAUS)
def test_keep_mask_matches_algorithm1(kind, seed, tau):
    log_ratio, advantages, response_mask = _batch(kind, seed)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    assert torch.equal(candidates, trust_region(log_ratio, advantages, response_mask))
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    assert torch.equal(keep, algorithm1_keep_mask(log_ratio, candidates, tau))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", TAUS)
def test_clip_bound_matches_authors_semantics(kind, seed, tau):
    log_ratio, advantages, response_mask = _batch(kind, seed)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    cap = float(second_moment_clip_bound(log_ratio, candidates, tau))
    expected = authors_clip_cap(log_ratio, candidates, tau)
    if math.isinf(expected):
        assert math.isinf(cap)
    else:
        assert cap == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert cap >= math.sqrt(tau) * (1 - 1e-12)  # the cap never bites below tau


@pytest.mark.parametrize("kind", ["light", "wide", "heavy"])
@pytest.mark.parametrize("seed", range(4))
def test_clip_variant_loss_and_gradient_match_ppo_clip(kind, seed):
    log_ratio, advantages, response_mask = _batch(kind, seed)
    behaviour = -torch.rand(log_ratio.shape, generator=torch.Generator().manual_seed(seed)) - 0.5
    tau = 0.04
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    cap = authors_clip_cap(log_ratio, candidates, tau)

    ours_lp = (behaviour + log_ratio).requires_grad_()
    out = m2po_token_losses(ours_lp, behaviour, advantages, response_mask, tau, variant="clip")
    out.token_losses.sum().backward()

    ref_lp = (behaviour + log_ratio).requires_grad_()
    ref = ppo_clip_token_losses(torch.where(response_mask, ref_lp - behaviour, 0.0), advantages, cap)
    ref = torch.where(response_mask, ref, 0.0)
    ref.sum().backward()

    torch.testing.assert_close(out.token_losses, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_lp.grad, ref_lp.grad, rtol=1e-5, atol=1e-6)


def test_exactly_at_threshold_keeps_everything():
    # d = 0.25 -> d**2 = 0.0625 exactly: mean == tau is within budget ("<= tau"), nothing masked.
    log_ratio = torch.full((3, 5), 0.25)
    candidates = torch.ones(3, 5, dtype=torch.bool)
    assert second_moment_keep_mask(log_ratio, candidates, 0.0625).all()
    assert math.isinf(float(second_moment_clip_bound(log_ratio, candidates, 0.0625)))
    # One step past the threshold masks every one of them (Algorithm 1 never stops partway:
    # the remaining mean stays 0.0625 > tau until the set is empty).
    keep = second_moment_keep_mask(log_ratio, candidates, 0.0625 - 2**-20)
    assert not keep.any()


def test_mixture_stops_exactly_when_mean_reaches_tau():
    # 4 tokens at 0.25 (m = 1/16) and 4 at 0.5 (m = 1/4). Keeping all four small ones and j big
    # ones gives mean (4/16 + j/4) / (4 + j); tau = (4/16 + 2/4) / 6 = 1/8 allows exactly j = 2.
    log_ratio = torch.tensor([0.25, 0.5, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5])
    candidates = torch.ones(8, dtype=torch.bool)
    keep = second_moment_keep_mask(log_ratio, candidates, 0.125)
    # Ties: the big tokens at the largest flat indices (7, then 5) go first.
    assert keep.tolist() == [True, True, True, True, True, False, True, False]
    assert torch.equal(keep, algorithm1_keep_mask(log_ratio, candidates, 0.125))


def test_one_token_batches():
    one = torch.ones(1, 1, dtype=torch.bool)
    assert second_moment_keep_mask(torch.tensor([[0.1]]), one, 0.04).all()  # 0.01 <= 0.04
    assert not second_moment_keep_mask(torch.tensor([[0.3]]), one, 0.04).any()  # 0.09 > 0.04
    assert float(second_moment_clip_bound(torch.tensor([[0.3]]), one, 0.04)) == pytest.approx(0.2)


def test_no_trust_region_token_is_never_masked():
    log_ratio = torch.tensor([[3.0, -3.0, 2.0, -2.0]])
    response_mask = torch.ones(1, 4, dtype=torch.bool)
    for advantages in (torch.zeros(1, 4), torch.tensor([[-1.0, 1.0, -1.0, 1.0]])):
        candidates = trust_region_mask(log_ratio, advantages, response_mask)
        assert not candidates.any()
        assert second_moment_keep_mask(log_ratio, candidates, 0.04).all()
        assert math.isinf(float(second_moment_clip_bound(log_ratio, candidates, 0.04)))


def test_padding_is_never_a_candidate():
    log_ratio = torch.tensor([[2.0, 2.0]])
    advantages = torch.ones(1, 2)
    response_mask = torch.tensor([[True, False]])
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    assert candidates.tolist() == [[True, False]]
    assert second_moment_keep_mask(log_ratio, candidates, 0.04).tolist() == [[False, True]]


@pytest.mark.parametrize("seed", range(3))
def test_large_heavy_tailed_batch(seed):
    # 128 x 256 = 32k tokens, ~thousands of trust-region tokens above tau.
    log_ratio, advantages, response_mask = _batch("heavy", seed, batch=128, length=256)
    log_ratio = log_ratio * 4
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    keep = second_moment_keep_mask(log_ratio, candidates, 0.04)
    assert (~keep).sum() > 100
    assert torch.equal(keep, algorithm1_keep_mask(log_ratio, candidates, 0.04))
    cap = float(second_moment_clip_bound(log_ratio, candidates, 0.04))
    assert cap == pytest.approx(authors_clip_cap(log_ratio, candidates, 0.04), rel=1e-9)


def test_inputs_of_any_float_dtype_and_shape():
    log_ratio, advantages, response_mask = _batch("wide", 0)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    expected = algorithm1_keep_mask(log_ratio.double(), candidates, 0.04)
    assert torch.equal(second_moment_keep_mask(log_ratio.double(), candidates, 0.04), expected)
    flat = second_moment_keep_mask(log_ratio.reshape(-1), candidates.reshape(-1), 0.04)
    assert torch.equal(flat.reshape(log_ratio.shape), second_moment_keep_mask(log_ratio, candidates, 0.04))
    bf16 = log_ratio.bfloat16()
    assert torch.equal(
        second_moment_keep_mask(bf16, candidates, 0.04), algorithm1_keep_mask(bf16, candidates, 0.04)
    )


def test_empty_input():
    empty = torch.zeros(0, 7)
    none = torch.zeros(0, 7, dtype=torch.bool)
    assert second_moment_keep_mask(empty, none, 0.04).shape == (0, 7)
    assert math.isinf(float(second_moment_clip_bound(empty, none, 0.04)))


# ---------------------------------------------------------------- the window refinement
# Data far above tau puts the cut inside the bulk of the candidates; there the candidates are
# narrowed by bucketed sums before anything is sorted. Forcing that refinement onto small batches
# (sort nothing above 0 candidates, few buckets) exercises every level against the references.


@pytest.fixture
def always_refine(monkeypatch):
    from m2po.algorithm import masking

    monkeypatch.setattr(masking, "_SORT_AT_MOST", 0)
    monkeypatch.setattr(masking, "_REFINE_BUCKETS", 3)
    monkeypatch.setattr(masking, "_MAX_REFINEMENTS", 12)
    return masking


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau", TAUS)
def test_refined_window_keeps_the_reference_mask_and_cap(always_refine, kind, seed, tau):
    log_ratio, advantages, response_mask = _batch(kind, seed, batch=16, length=32)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    assert torch.equal(second_moment_keep_mask(log_ratio, candidates, tau), algorithm1_keep_mask(log_ratio, candidates, tau))
    cap = float(second_moment_clip_bound(log_ratio, candidates, tau))
    expected = authors_clip_cap(log_ratio, candidates, tau)
    assert math.isinf(cap) if math.isinf(expected) else cap == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_refinement_narrows_to_a_small_window(always_refine):
    # N(0, 0.3**2): M2 before masking ~0.09, half the candidates above tau = 0.04.
    g = torch.Generator().manual_seed(0)
    log_ratio = 0.3 * torch.randn(4096, generator=g)
    candidates = torch.ones(4096, dtype=torch.bool)
    window = always_refine._split_candidates(log_ratio, candidates, 0.04, "mask")
    num_above_tau = int((log_ratio.double().square() > 0.04).sum())
    assert num_above_tau > 1500
    assert window.index.numel() <= 4  # 12 levels of 3 buckets leave (almost) nothing to sort
    assert window.above_index.numel() > 100  # surely masked without a sort
    assert torch.equal(
        second_moment_keep_mask(log_ratio, candidates, 0.04), algorithm1_keep_mask(log_ratio, candidates, 0.04)
    )


@pytest.mark.parametrize("tau", [0.04, 0.01])
def test_stress_regime_at_benchmark_size(tau):
    # The benchmark's stress regime at 64k tokens, with the real window settings (no monkeypatch).
    g = torch.Generator().manual_seed(1)
    log_ratio = 0.3 * torch.randn(64, 1024, generator=g)
    advantages = torch.randn(64, 1, generator=g).expand(64, 1024)
    response_mask = torch.ones(64, 1024, dtype=torch.bool)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    keep = second_moment_keep_mask(log_ratio, candidates, tau)
    assert (~keep).sum() > 1000
    assert torch.equal(keep, algorithm1_keep_mask(log_ratio, candidates, tau))
    cap = float(second_moment_clip_bound(log_ratio, candidates, tau))
    assert cap == pytest.approx(authors_clip_cap(log_ratio, candidates, tau), rel=1e-9)
