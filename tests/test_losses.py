"""M2PO / no-trust-region losses: values, gradients, statistics, aggregation and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import agg_loss

from m2po.algorithm import (
    LOSS_AGG_MODES,
    aggregate_token_losses,
    m2po_loss,
    m2po_token_losses,
    no_trust_region_loss,
    stats_to_floats,
    validate_policy_inputs,
)
from tests.reference import algorithm1_keep_mask, second_moments, trust_region


def _inputs(seed=0, batch=6, length=20, scale=0.4):
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(batch, length, generator=g) * 3
    log_probs = behaviour + scale * torch.randn(batch, length, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    response_mask = torch.arange(length)[None, :] < lengths[:, None]
    # Padding holds garbage, as real batches may: it must not leak into anything.
    log_probs = torch.where(response_mask, log_probs, torch.tensor(float("nan")))
    return log_probs, behaviour, advantages, response_mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.04, 0.2])
def test_mask_gradient_is_masked_importance_weighted_policy_gradient(seed, tau):
    log_probs, behaviour, advantages, response_mask = _inputs(seed)
    log_probs.requires_grad_()
    loss, _ = m2po_loss(log_probs, behaviour, advantages, response_mask, tau)
    loss.backward()

    log_ratio = torch.where(response_mask, log_probs.detach() - behaviour, 0.0)
    keep = algorithm1_keep_mask(log_ratio, trust_region(log_ratio, advantages, response_mask), tau)
    ratio = log_ratio.exp()
    n_valid = response_mask.sum()
    # d/d log pi_i of -(1/N) sum M r A = -(1/N) M_i r_i A_i  (d r / d log pi = r)
    expected_grad = torch.where(response_mask & keep, -ratio * advantages / n_valid, 0.0)
    torch.testing.assert_close(log_probs.grad, expected_grad, rtol=1e-6, atol=1e-8)
    expected_loss = torch.where(response_mask & keep, -ratio * advantages, 0.0).sum() / n_valid
    torch.testing.assert_close(loss.detach(), expected_loss)


def test_no_trust_region_gradient_and_equivalence_to_infinite_tau():
    log_probs, behaviour, advantages, response_mask = _inputs(1, scale=1.5)
    lp_a = log_probs.clone().requires_grad_()
    lp_b = log_probs.clone().requires_grad_()
    loss_a, stats_a = no_trust_region_loss(lp_a, behaviour, advantages, response_mask)
    loss_b, stats_b = m2po_loss(lp_b, behaviour, advantages, response_mask, math.inf)
    loss_a.backward()
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(lp_a.grad, lp_b.grad)
    ratio = torch.where(response_mask, (log_probs - behaviour).exp(), 0.0)
    torch.testing.assert_close(lp_a.grad, -ratio * advantages / response_mask.sum())
    assert stats_to_floats(stats_a) == stats_to_floats(stats_b)
    assert stats_a["masked_fraction"] == 0


def test_importance_weights_multiply_the_token_loss_and_gradient():
    log_probs, behaviour, advantages, response_mask = _inputs(2)
    weights = torch.rand(log_probs.shape, generator=torch.Generator().manual_seed(9)) + 0.5
    lp_w = log_probs.clone().requires_grad_()
    lp = log_probs.clone().requires_grad_()
    out_w = m2po_token_losses(lp_w, behaviour, advantages, response_mask, importance_weights=weights)
    out = m2po_token_losses(lp, behaviour, advantages, response_mask)
    out_w.token_losses.sum().backward()
    out.token_losses.sum().backward()
    torch.testing.assert_close(out_w.token_losses, out.token_losses * weights)
    torch.testing.assert_close(lp_w.grad, lp.grad * torch.where(response_mask, weights, 0.0))


@pytest.mark.parametrize("variant", ["mask", "clip"])
def test_stats_against_brute_force(variant):
    log_probs, behaviour, advantages, response_mask = _inputs(3, scale=0.5)
    out = m2po_token_losses(log_probs, behaviour, advantages, response_mask, 0.04, variant)
    stats = stats_to_floats(out.stats)
    log_ratio = torch.where(response_mask, log_probs - behaviour, 0.0)
    flat_valid = response_mask.reshape(-1).tolist()
    flat_tr = trust_region(log_ratio, advantages, response_mask).reshape(-1).tolist()
    flat_keep = out.keep_mask.reshape(-1).tolist()
    moments = second_moments(log_ratio)
    d = log_ratio.reshape(-1).tolist()

    def mean(xs):
        return math.fsum(xs) / len(xs)

    valid = [i for i in range(len(d)) if flat_valid[i]]
    tr = [i for i in valid if flat_tr[i]]
    assert stats["m2_before"] == pytest.approx(mean([moments[i] for i in tr]), rel=1e-5)
    assert stats["m2_all_before"] == pytest.approx(mean([moments[i] for i in valid]), rel=1e-5)
    assert stats["trust_region_fraction"] == pytest.approx(len(tr) / len(valid))
    assert stats["masked_fraction"] == pytest.approx(sum(not flat_keep[i] for i in valid) / len(valid))
    assert stats["masked_fraction"] > 0
    assert stats["ratio_mean"] == pytest.approx(mean([math.exp(d[i]) for i in valid]), rel=1e-5)
    assert stats["ratio_max"] == pytest.approx(max(math.exp(d[i]) for i in valid), rel=1e-5)
    assert stats["ppo_kl"] == pytest.approx(mean([-d[i] for i in valid]), rel=1e-5, abs=1e-7)
    if variant == "mask":
        assert stats["m2_after"] == pytest.approx(mean([moments[i] for i in tr if flat_keep[i]]), rel=1e-5)
        assert stats["m2_after"] <= 0.04 + 1e-7
        assert stats["m2_all_after"] == pytest.approx(mean([moments[i] for i in valid if flat_keep[i]]), rel=1e-5)
    else:
        cap2 = stats["log_ratio_cap"] ** 2
        assert stats["m2_after"] == pytest.approx(0.04, rel=1e-5)  # the cap meets the budget exactly
        assert stats["m2_all_after"] == pytest.approx(
            mean([min(moments[i], cap2) if flat_tr[i] else moments[i] for i in valid]), rel=1e-5
        )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregation_matches_verl_agg_loss(mode):
    log_probs, behaviour, advantages, response_mask = _inputs(4)
    out = m2po_token_losses(log_probs, behaviour, advantages, response_mask)
    ours = aggregate_token_losses(out.token_losses, response_mask, mode)
    theirs = agg_loss(out.token_losses, response_mask, mode)
    torch.testing.assert_close(ours, theirs.to(ours.dtype))


def test_unknown_aggregation_mode():
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        aggregate_token_losses(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), "mean")


@pytest.mark.parametrize("variant", ["mask", "clip"])
def test_empty_mask_gives_zero_loss_and_no_nan(variant):
    log_probs, behaviour, advantages, _ = _inputs(5)
    empty = torch.zeros_like(log_probs, dtype=torch.bool)
    lp = log_probs.clone().requires_grad_()
    for mode in LOSS_AGG_MODES:
        loss, stats = m2po_loss(lp, behaviour, advantages, empty, 0.04, variant, loss_agg_mode=mode)
        assert loss.item() == 0.0
        assert all(math.isfinite(v) for v in stats_to_floats(stats).values())
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))


def test_every_token_masked_gives_zero_loss_and_gradient():
    # All tokens in the trust region with d**2 = 1 > tau: Algorithm 1 masks them all.
    behaviour = torch.zeros(2, 3)
    log_probs = torch.ones(2, 3, requires_grad=True)
    advantages = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, stats = m2po_loss(log_probs, behaviour, advantages, mask, 0.04)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(log_probs.grad, torch.zeros(2, 3))
    assert stats_to_floats(stats)["masked_fraction"] == 1.0
    assert stats_to_floats(stats)["m2_after"] == 0.0


def test_extreme_log_ratios_stay_finite():
    # |log r| of 60 would overflow exp in float32; like verl's vanilla loss we clamp at 20.
    behaviour = torch.tensor([[-70.0, -1.0, -1.0]])
    log_probs = torch.tensor([[-10.0, -61.0, -1.0]], requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    for variant in ("mask", "clip"):
        loss, stats = m2po_loss(log_probs, behaviour, advantages, mask, 0.04, variant)
        loss.backward()
        assert math.isfinite(loss.item())
        assert torch.isfinite(log_probs.grad).all()
        assert stats_to_floats(stats)["ratio_max"] == pytest.approx(math.exp(20), rel=1e-5)
        log_probs.grad = None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["log_probs", "behaviour_log_probs", "advantages", "importance_weights"])
def test_non_finite_values_on_valid_tokens_are_rejected(bad, where):
    log_probs, behaviour, advantages, response_mask = _inputs(6)
    log_probs = torch.where(response_mask, log_probs, -1.0)
    named = {
        "log_probs": log_probs.clone(),
        "behaviour_log_probs": behaviour.clone(),
        "advantages": advantages.clone(),
        "importance_weights": torch.ones_like(log_probs),
    }
    named[where][0, 0] = bad
    with pytest.raises(ValueError, match=rf"non-finite values .*'{where}': 1"):
        m2po_token_losses(
            named["log_probs"],
            named["behaviour_log_probs"],
            named["advantages"],
            response_mask,
            importance_weights=named["importance_weights"],
        )


def test_non_finite_values_on_padding_are_ignored():
    log_probs, behaviour, advantages, response_mask = _inputs(7)  # NaN on padding
    assert (~response_mask).any()
    behaviour = torch.where(response_mask, behaviour, float("-inf"))
    loss, _ = m2po_loss(log_probs.requires_grad_(), behaviour, advantages, response_mask)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(log_probs.grad).all()


def test_shape_mismatch_is_rejected():
    log_probs, behaviour, advantages, response_mask = _inputs(8)
    with pytest.raises(ValueError, match="share one"):
        m2po_loss(log_probs, behaviour[:, :-1], advantages, response_mask)


def test_non_boolean_mask_is_rejected():
    log_probs, behaviour, advantages, response_mask = _inputs(8)
    with pytest.raises(TypeError, match=r"response_mask must be a bool tensor.*response_mask.bool\(\)"):
        m2po_loss(log_probs, behaviour, advantages, response_mask.float())
    with pytest.raises(TypeError, match="log_probs must be a floating-point"):
        validate_policy_inputs(log_probs.long(), behaviour, advantages, response_mask)


@pytest.mark.parametrize("tau", [0.0, -0.04, float("nan"), "0.04", None, True])
def test_invalid_threshold_is_rejected(tau):
    log_probs, behaviour, advantages, response_mask = _inputs(8)
    with pytest.raises(ValueError, match="m2_threshold must be"):
        m2po_loss(log_probs, behaviour, advantages, response_mask, m2_threshold=tau)


def test_unknown_variant_is_rejected():
    log_probs, behaviour, advantages, response_mask = _inputs(8)
    with pytest.raises(ValueError, match=r"m2po_variant must be one of \['mask', 'clip', 'decoupled'\]"):
        m2po_loss(log_probs, behaviour, advantages, response_mask, variant="areal")
