"""AReaL's decoupled M2PO (`m2po_variant=decoupled`) against brute force, in plain PyTorch and
through verl's own rollout-correction weights and `ppo_loss`."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from verl.protocol import DataProto
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.workers.utils.losses import ppo_loss

from m2po.algorithm import decoupled_m2po_loss, decoupled_m2po_token_losses, m2po_token_losses, stats_to_floats
from m2po.verl_integration.behaviour_ratio import UNTRUNCATED_IS_THRESHOLD
from tests.reference import algorithm1_keep_mask, areal_keep_mask, decoupled_token_losses, second_moments
from m2po.verl_integration.config import actor_config
from tests.verl_batches import micro_batch, response_grad


def _three_policies(seed, batch=4, length=9, staleness=0.4, drift=0.3):
    """Behaviour, proximal and current log-probs: the proximal policy `staleness` away from the
    behaviour one, the current one `drift` away from the proximal one."""
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(batch, length, generator=g) * 3
    proximal = behaviour + staleness * torch.randn(batch, length, generator=g)
    current = proximal + drift * torch.randn(batch, length, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return current, proximal, behaviour, advantages, mask


def _both(current, proximal, behaviour, advantages, mask, tau, low=0.2, high=0.28, c=3.0):
    ours_lp = current.clone().requires_grad_()
    ref_lp = current.clone().requires_grad_()
    out = decoupled_m2po_token_losses(ours_lp, proximal, proximal - behaviour, advantages, mask, tau, low, high, c)
    ref = decoupled_token_losses(ref_lp, proximal, proximal - behaviour, advantages, mask, tau, low, high, c)
    out.token_losses.sum().backward()
    ref.sum().backward()
    return out, ref, ours_lp.grad, ref_lp.grad


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.01, 0.04, 0.16, math.inf])
def test_token_losses_and_gradients_equal_brute_force(seed, tau):
    out, ref, grad, ref_grad = _both(*_three_policies(seed), tau)
    torch.testing.assert_close(out.token_losses, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


@given(
    seed=st.integers(0, 10_000),
    tau=st.floats(1e-3, 1.0),
    staleness=st.floats(0.0, 1.5),
    low=st.floats(0.05, 0.5),
    high=st.floats(0.05, 0.5),
    dual=st.booleans(),
)
def test_brute_force_agreement_property(seed, tau, staleness, low, high, dual):
    out, ref, grad, ref_grad = _both(*_three_policies(seed, staleness=staleness), tau, low, high, 3.0 if dual else None)
    torch.testing.assert_close(out.token_losses, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


@given(seed=st.integers(0, 10_000), tau=st.floats(1e-3, 1.0), staleness=st.floats(0.05, 1.5))
def test_the_mask_is_areals_rule_and_ignores_the_current_policy(seed, tau, staleness):
    current, proximal, behaviour, advantages, mask = _three_policies(seed, staleness=staleness)
    d = proximal - behaviour
    keep = decoupled_m2po_token_losses(current, proximal, d, advantages, mask, tau, 10.0, 10.0).keep_mask
    # the M2 part of the mask depends only on pi_prox / pi_behav: a different current policy, same mask
    other = decoupled_m2po_token_losses(current + 0.7, proximal, d, advantages, mask, tau, 10.0, 10.0).keep_mask
    assert torch.equal(keep, other)
    moments = second_moments(torch.where(mask, d, 0.0))
    valid = [i for i, v in enumerate(mask.reshape(-1).tolist()) if v]
    kept = [i for i in valid if keep.reshape(-1)[i]]
    # AReaL stops at mean < tau and always keeps a token; the paper's rule (ours) at <= tau, and
    # masks everything when even the smallest d**2 exceeds tau. Away from those two cases they agree.
    assume(kept and all(Fraction(moments[i]) != Fraction(tau) for i in valid))
    mean_kept = sum(Fraction(moments[i]) for i in kept) / len(kept)
    assume(mean_kept != Fraction(tau))
    assert torch.equal(keep, areal_keep_mask(d, mask, tau))
    assert mean_kept <= Fraction(tau)


def test_no_mask_and_no_clip_is_the_behaviour_ratio_policy_gradient():
    """w * (pi_theta / pi_prox) = pi_theta / pi_behav: with tau = inf and a clip that never binds, the
    decoupled loss is the no-trust-region loss against the behaviour policy, gradient included."""
    current, proximal, behaviour, advantages, mask = _three_policies(3)
    a = current.clone().requires_grad_()
    b = current.clone().requires_grad_()
    out = decoupled_m2po_token_losses(a, proximal, proximal - behaviour, advantages, mask, math.inf, 1e6, 1e6)
    plain = m2po_token_losses(b, behaviour, advantages, mask, m2_threshold=math.inf)
    out.token_losses.sum().backward()
    plain.token_losses.sum().backward()
    torch.testing.assert_close(out.token_losses, plain.token_losses)
    torch.testing.assert_close(a.grad, b.grad)


def test_stats_against_brute_force():
    current, proximal, behaviour, advantages, mask = _three_policies(5, staleness=0.6)
    d = proximal - behaviour
    out = decoupled_m2po_token_losses(current, proximal, d, advantages, mask, 0.04, 0.2, 0.2, None)
    stats = stats_to_floats(out.stats)
    flat_valid = mask.reshape(-1).tolist()
    moments = second_moments(torch.where(mask, d, 0.0))
    m2_keep = areal_keep_mask(d, mask, 0.04).reshape(-1).tolist()  # at least one kept here
    valid = [i for i, v in enumerate(flat_valid) if v]
    kept = [i for i in valid if m2_keep[i]]
    ratio = (current - proximal).exp().reshape(-1).tolist()
    adv = advantages.reshape(-1).tolist()
    clipped = [i for i in kept if (adv[i] > 0 and ratio[i] > 1.2) or (adv[i] < 0 and ratio[i] < 0.8)]
    assert stats["m2_before"] == pytest.approx(math.fsum(moments[i] for i in valid) / len(valid), rel=1e-6)
    assert stats["m2_after"] == pytest.approx(math.fsum(moments[i] for i in kept) / len(kept), rel=1e-6)
    assert stats["m2_after"] <= 0.04 < stats["m2_before"]
    assert stats["masked_fraction"] == pytest.approx((len(valid) - len(kept)) / len(valid))
    assert stats["clip_fraction"] == pytest.approx(len(clipped) / len(valid)) and stats["clip_fraction"] > 0
    assert stats["trust_region_fraction"] == 1.0  # every valid token is a candidate
    weights = [math.exp(x) for x in d.reshape(-1).tolist()]
    assert stats["behaviour_ratio_mean"] == pytest.approx(math.fsum(weights[i] for i in valid) / len(valid), rel=1e-6)
    assert stats["behaviour_ratio_max"] == pytest.approx(max(weights[i] for i in valid), rel=1e-6)
    assert stats["ratio_mean"] == pytest.approx(math.fsum(ratio[i] for i in valid) / len(valid), rel=1e-6)
    # keep_mask: no gradient where masked or clipped
    no_gradient = {i for i in valid if not m2_keep[i]} | set(clipped)
    assert [i for i in valid if not out.keep_mask.reshape(-1)[i]] == sorted(no_gradient)


def test_scalar_loss_is_the_token_mean():
    current, proximal, behaviour, advantages, mask = _three_policies(7)
    loss, _ = decoupled_m2po_loss(current, proximal, proximal - behaviour, advantages, mask)
    out = decoupled_m2po_token_losses(current, proximal, proximal - behaviour, advantages, mask)
    torch.testing.assert_close(loss, out.token_losses.sum() / mask.sum())


def test_bad_inputs_are_refused():
    current, proximal, behaviour, advantages, mask = _three_policies(8)
    d = (proximal - behaviour).clone()
    d[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .*'proximal_behaviour_log_ratio': 1"):
        decoupled_m2po_token_losses(current, proximal, d, advantages, mask)
    with pytest.raises(ValueError, match="share one"):
        decoupled_m2po_token_losses(current, proximal, d[:, :-1], advantages, mask)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        decoupled_m2po_token_losses(current, proximal, proximal - behaviour, advantages, mask, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="use decoupled_m2po_token_losses"):
        m2po_token_losses(current, behaviour, advantages, mask, variant="decoupled")


def _verl_weights(proximal, behaviour, mask):
    """rollout_is_weights exactly as verl's trainer computes them in decoupled mode."""
    batch = DataProto.from_dict(
        tensors={"old_log_probs": proximal, "rollout_log_probs": behaviour, "response_mask": mask.long()}
    )
    config = {"rollout_is": "token", "rollout_is_threshold": UNTRUNCATED_IS_THRESHOLD, "rollout_is_batch_normalize": False}
    batch, _ = compute_rollout_correction_and_add_to_batch(batch, config)
    return batch.batch["rollout_is_weights"]


def _verl_matches_reference(policies, config, extra_tokens: int, tau: float, cap: float | None) -> dict:
    """verl computes the weights from the proximal and behaviour log-probs and its ppo_loss calls our
    registered loss; loss and gradient must equal the token-by-token reference (clip 0.2, dual clip 3),
    normalised by the mini-batch's tokens (`extra_tokens` as if another micro-batch held them)."""
    current, proximal, behaviour, advantages, mask = policies
    prompts = [2] * current.shape[0]
    tokens = int(mask.sum()) + extra_tokens
    model_output, data, flat = micro_batch(
        current, proximal, advantages, mask, prompts, batch_num_tokens=tokens, global_batch_size=8,
        rollout_is_weights=_verl_weights(proximal, behaviour, mask),
    )
    loss, metrics = ppo_loss(config, model_output, data)
    loss.backward()
    ref_lp = current.clone().requires_grad_()
    ref = decoupled_token_losses(ref_lp, proximal, proximal - behaviour, advantages, mask, tau, 0.2, 0.2, 3.0, cap)
    (ref.sum() / tokens).backward()
    torch.testing.assert_close(loss, ref.sum() / tokens, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(response_grad(flat.grad, mask, prompts), ref_lp.grad, rtol=1e-5, atol=1e-7)
    return metrics


@pytest.mark.parametrize("seed", range(4))
def test_through_verls_rollout_correction_and_ppo_loss(seed):
    """verl's decoupled mode end to end on one micro-batch: verl computes the weights from the
    proximal and behaviour log-probs, verl's ppo_loss calls our loss; the result equals brute force
    on the three policies (loss, gradient), normalised by the mini-batch's tokens."""
    policies = _three_policies(seed, staleness=0.5)
    config = actor_config(loss_mode="m2po", clip_ratio=0.2, m2_threshold=0.04, m2po_variant="decoupled", m2_scope="micro_batch")
    metrics = _verl_matches_reference(policies, config, extra_tokens=10, tau=0.04, cap=None)
    assert metrics["actor/m2po/masked_fraction"].aggregate() > 0
    clipfrac = metrics["actor/pg_clipfrac"].aggregate()
    assert clipfrac == pytest.approx(
        metrics["actor/m2po/masked_fraction"].aggregate() + metrics["actor/m2po/clip_fraction"].aggregate()
    )


def test_verl_wrapper_refuses_missing_or_zeroed_weights():
    current, proximal, behaviour, advantages, mask = _three_policies(1)
    config = actor_config(loss_mode="m2po", m2po_variant="decoupled", m2_scope="micro_batch")
    model_output, data, _ = micro_batch(current, proximal, advantages, mask, [2] * 4, batch_num_tokens=40,
                                        global_batch_size=4)
    with pytest.raises(ValueError, match=r"rollout_is=token, .*rollout_is_threshold=5e\+08 and bypass_mode=false"):
        ppo_loss(config, model_output, data)
    icepop = torch.where(mask, torch.ones_like(current), 0.0)
    icepop[0, 0] = 0.0  # what an IcePop band does to a weight outside it
    model_output, data, _ = micro_batch(current, proximal, advantages, mask, [2] * 4, batch_num_tokens=40,
                                        global_batch_size=4, rollout_is_weights=icepop)
    with pytest.raises(ValueError, match="rollout_is_weights <= 0"):
        ppo_loss(config, model_output, data)


@pytest.mark.parametrize("seed", range(4))
def test_decoupled_ppo_through_verl_is_areals_loss(seed):
    """loss_mode=decoupled_ppo (AReaL's use_decoupled_loss, behav_imp_weight_cap 5) in verl's decoupled
    mode against the token-by-token reference with no M2 mask: loss, gradient, capped and clipped tokens."""
    current, proximal, behaviour, advantages, mask = policies = _three_policies(seed, staleness=1.5)
    config = actor_config(loss_mode="decoupled_ppo", clip_ratio=0.2, behaviour_weight_cap=5.0)
    metrics = _verl_matches_reference(policies, config, extra_tokens=0, tau=math.inf, cap=5.0)
    tokens = int(mask.sum())
    capped = (mask & ((proximal - behaviour).exp() > 5.0)).sum().item() / tokens
    assert capped > 0 and metrics["actor/m2po/behaviour_capped_fraction"].aggregate() == pytest.approx(capped)
    assert metrics["actor/m2po/masked_fraction"].aggregate() == 0  # no M2 mask
    # without a cap, the loss is the decoupled M2PO loss with tau = inf
    uncapped = decoupled_m2po_token_losses(current, proximal, proximal - behaviour, advantages, mask, math.inf, 0.2, 0.2, 3.0)
    reference = decoupled_token_losses(current, proximal, proximal - behaviour, advantages, mask, math.inf, 0.2, 0.2, 3.0)
    torch.testing.assert_close(uncapped.token_losses, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cap", [1.0, 0.5, -2.0, True, "5"])
def test_a_behaviour_weight_cap_that_is_not_above_one_is_refused(cap):
    from m2po.verl_integration.config import M2POPolicyLossConfig

    with pytest.raises(ValueError, match="policy_loss.behaviour_weight_cap must be a number > 1"):
        M2POPolicyLossConfig(loss_mode="decoupled_ppo", behaviour_weight_cap=cap)


@pytest.mark.parametrize(("loss_mode", "variant"), [("m2po", "mask"), ("vanilla", "mask"), ("gppo", "mask")])
def test_a_behaviour_weight_cap_where_nothing_reads_it_is_refused(loss_mode, variant):
    from m2po.verl_integration.config import M2POPolicyLossConfig

    with pytest.raises(ValueError, match="behaviour_weight_cap=5.0 has no effect"):
        M2POPolicyLossConfig(loss_mode=loss_mode, m2po_variant=variant, behaviour_weight_cap=5.0)
    M2POPolicyLossConfig(loss_mode="m2po", m2po_variant="decoupled", behaviour_weight_cap=5.0)  # read there


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.01, 0.04, math.inf])
def test_the_kept_denominator_is_areals_loss_over_the_tokens_the_mask_kept(seed, tau):
    """AReaL removes the masked tokens from its loss mask: its micro-batch loss is the sum over the
    kept tokens divided by their number (reference: the token-by-token losses and AReaL's count)."""
    current, proximal, behaviour, advantages, mask = _three_policies(seed, staleness=0.6)
    d = proximal - behaviour
    ours_lp, ref_lp = current.clone().requires_grad_(), current.clone().requires_grad_()
    out = decoupled_m2po_token_losses(ours_lp, proximal, d, advantages, mask, tau, 0.2, 0.28, 3.0, denominator="kept")
    ours = out.token_losses.sum() / mask.sum()  # verl's token-mean over the call's valid tokens
    kept = int((algorithm1_keep_mask(torch.where(mask, d, 0.0), mask, tau) & mask).sum())
    reference = decoupled_token_losses(ref_lp, proximal, d, advantages, mask, tau, 0.2, 0.28, 3.0).sum() / max(kept, 1)
    ours.backward()
    reference.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_lp.grad, ref_lp.grad, rtol=1e-6, atol=1e-7)
    valid = decoupled_m2po_token_losses(current, proximal, d, advantages, mask, tau, 0.2, 0.28, 3.0)
    if tau < math.inf:  # the mask kept fewer tokens than there are: AReaL's step is larger
        assert kept < int(mask.sum())
        torch.testing.assert_close(ours, valid.token_losses.sum() / mask.sum() * int(mask.sum()) / kept)
    assert stats_to_floats(out.stats) == stats_to_floats(valid.stats)  # the statistics do not change


def test_the_kept_denominator_through_verls_ppo_loss_and_its_refusals():
    from m2po.verl_integration.config import M2POPolicyLossConfig

    current, proximal, behaviour, advantages, mask = _three_policies(3, staleness=0.6)
    prompts, tokens = [2] * current.shape[0], int(mask.sum())
    losses = {}
    for denominator in ("valid", "kept"):
        config = actor_config(loss_mode="m2po", m2po_variant="decoupled", decoupled_denominator=denominator, m2_scope="micro_batch")
        model_output, data, _ = micro_batch(current, proximal, advantages, mask, prompts, batch_num_tokens=tokens,
                                            global_batch_size=4, rollout_is_weights=_verl_weights(proximal, behaviour, mask))
        losses[denominator], metrics = ppo_loss(config, model_output, data)
    kept = tokens - round(metrics["actor/m2po/masked_fraction"].aggregate() * tokens)
    assert 0 < kept < tokens
    torch.testing.assert_close(losses["kept"], losses["valid"] * tokens / kept)
    with pytest.raises(ValueError, match=r"policy_loss.decoupled_denominator must be one of \['valid', 'kept'\]"):
        M2POPolicyLossConfig(loss_mode="m2po", m2po_variant="decoupled", decoupled_denominator="areal")
    with pytest.raises(ValueError, match="decoupled_denominator='kept' has no effect with loss_mode='m2po'"):
        M2POPolicyLossConfig(loss_mode="m2po", m2po_variant="mask", decoupled_denominator="kept")
    M2POPolicyLossConfig(loss_mode="decoupled_ppo", decoupled_denominator="kept")  # read there
