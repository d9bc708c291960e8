"""TOPR (Tapered Off-Policy REINFORCE) against a literal per-response implementation of the
paper's update, and through verl's registry."""

from __future__ import annotations

import math

import pytest
import torch

from m2po.algorithm import topr_token_losses


def batch(seed: int, rows: int = 8, length: int = 12, scale: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(rows, length, generator=g, dtype=torch.float64) - 0.2
    log_probs = behaviour + scale * torch.randn(rows, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, length).clone()
    advantages[0] = 0.0  # a group with no signal
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (rows,), generator=g)[:, None]
    return log_probs, behaviour, advantages, mask


def literal_topr(log_probs, behaviour, advantages, mask):
    """Per response, as the paper writes it: R >= 0 -> weight 1; R < 0 -> [pi(tau)/mu(tau)]_0^1,
    pi(tau)/mu(tau) = prod over the response's tokens; loss -w R log pi(token), summed per token."""
    losses, grads = [], []
    for i in range(log_probs.shape[0]):
        valid = [t for t in range(log_probs.shape[1]) if mask[i, t]]
        log_ratio = sum(float(log_probs[i, t] - behaviour[i, t]) for t in valid)
        row_loss, row_grad = [], []
        for t in range(log_probs.shape[1]):
            a = float(advantages[i, t])
            w = 1.0 if a >= 0 else min(1.0, math.exp(log_ratio))
            row_loss.append(-w * a * float(log_probs[i, t]) if mask[i, t] else 0.0)
            row_grad.append(-w * a if mask[i, t] else 0.0)
        losses.append(row_loss)
        grads.append(row_grad)
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0])
def test_topr_matches_the_literal_update(seed, scale):
    log_probs, behaviour, advantages, mask = batch(seed, scale=scale)
    expected_loss, expected_grad = literal_topr(log_probs, behaviour, advantages, mask)
    lp = log_probs.clone().requires_grad_()
    out = topr_token_losses(lp, behaviour, advantages, mask)
    out.token_losses.sum().backward()
    torch.testing.assert_close(out.token_losses, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert out.keep_mask.all()


def test_positive_examples_have_no_ratio_and_negative_ones_are_tapered():
    # Row 0: A > 0 and the response 2x more likely now -> weight 1 (not 2).
    # Row 1: A < 0, 2x more likely -> truncated to 1.  Row 2: A < 0, half as likely -> 0.5.
    behaviour = torch.zeros(3, 2, dtype=torch.float64)
    log_probs = torch.tensor([[math.log(2), 0.0], [math.log(2), 0.0], [math.log(0.5), 0.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(3, 2, dtype=torch.bool)
    lp = log_probs.clone().requires_grad_()
    out = topr_token_losses(lp, behaviour, advantages, mask)
    out.token_losses.sum().backward()
    assert lp.grad.tolist() == [[-1.0, -1.0], [1.0, 1.0], [0.5, 0.5]]
    assert float(out.stats["truncated_fraction"]) == pytest.approx(2 / 6)  # row 2's tokens
    assert float(out.stats["negative_weight_mean"]) == pytest.approx(0.75)


def test_a_huge_sequence_ratio_neither_overflows_nor_weighs():
    # 200 tokens at log r = 5 each: pi/mu = e^1000 (inf in float64); a negative example's weight is 1.
    log_probs = torch.full((1, 200), 5.0, dtype=torch.float64)
    out = topr_token_losses(log_probs, torch.zeros_like(log_probs), -torch.ones_like(log_probs),
                            torch.ones(1, 200, dtype=torch.bool))
    assert torch.isfinite(out.token_losses).all() and float(out.stats["truncated_fraction"]) == 0.0


def test_topr_is_registered_in_verl_and_aggregates_like_verl():
    import verl  # noqa: F401  (the plugin registers the losses)
    from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn

    from m2po.verl_integration.config import actor_config

    log_probs, behaviour, advantages, mask = batch(3)
    log_probs, behaviour, advantages = log_probs.float(), behaviour.float(), advantages.float()
    config = actor_config("topr")
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
    loss, metrics = get_policy_loss_fn("topr")(
        old_log_prob=behaviour, log_prob=log_probs, advantages=advantages, response_mask=mask,
        loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
    )
    expected = agg_loss(loss_mat=topr_token_losses(log_probs, behaviour, advantages, mask).token_losses,
                        loss_mask=mask, loss_agg_mode="token-mean", **config.global_batch_info)
    torch.testing.assert_close(loss, expected)
    assert metrics["actor/pg_clipfrac"] == metrics["actor/topr/truncated_fraction"]
    assert {"actor/ppo_kl", "actor/topr/negative_weight_mean"} <= set(metrics)
