"""GPPO (gradient-preserving clipping, Klear-Reasoner arXiv 2508.07629) against a literal per-token
table of its value and gradient, against verl's vanilla dual-clip PPO loss (same values by
construction), and through verl's registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from m2po.algorithm import gppo_token_losses

LOW, HIGH, DUAL = 0.2, 0.28, 10.0  # Klear-Reasoner's released script


def batch(seed: int, rows: int = 8, length: int = 16, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    behaviour = -torch.rand(rows, length, generator=g, dtype=torch.float64) - 0.1
    log_probs = behaviour + scale * torch.randn(rows, length, generator=g, dtype=torch.float64)
    advantages = torch.randn(rows, 1, generator=g, dtype=torch.float64).expand(rows, length).clone()
    advantages[0] = 0.0
    mask = torch.arange(length)[None] < torch.randint(1, length + 1, (rows,), generator=g)[:, None]
    return log_probs, behaviour, advantages, mask


def literal_gppo(log_probs, behaviour, advantages, mask, low=LOW, high=HIGH, dual=DUAL):
    """Per token, the case table of the paper's objective: (loss value, d loss / d log pi, branch)."""
    losses, grads, branches = [], [], []
    for i in range(log_probs.shape[0]):
        row_loss, row_grad, row_branch = [], [], []
        for t in range(log_probs.shape[1]):
            if not mask[i, t]:
                row_loss.append(0.0), row_grad.append(0.0), row_branch.append("pad")
                continue
            a, r = float(advantages[i, t]), math.exp(float(log_probs[i, t] - behaviour[i, t]))
            if a < 0 and r > dual:  # dual clip: constant -A c
                value, grad, branch = -a * dual, 0.0, "dual"
            elif a > 0 and r > 1 + high:  # clipped, gradient kept with weight 1 + eps_h
                value, grad, branch = -a * (1 + high), -a * (1 + high), "high"
            elif a < 0 and r < 1 - low:  # clipped, gradient kept with weight 1 - eps_l
                value, grad, branch = -a * (1 - low), -a * (1 - low), "low"
            else:  # the ratio itself: d(-A r)/d log pi = -A r
                value, grad, branch = -a * r, -a * r, "ratio"
            row_loss.append(value), row_grad.append(grad), row_branch.append(branch)
        losses.append(row_loss), grads.append(row_grad), branches.append(row_branch)
    f64 = torch.float64
    return torch.tensor(losses, dtype=f64), torch.tensor(grads, dtype=f64), branches


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("scale", [0.05, 0.5, 3.0])
def test_gppo_matches_the_literal_case_table(seed, scale):
    log_probs, behaviour, advantages, mask = batch(seed, scale=scale)
    expected_loss, expected_grad, branches = literal_gppo(log_probs, behaviour, advantages, mask)
    lp = log_probs.clone().requires_grad_()
    out = gppo_token_losses(lp, behaviour, advantages, mask, LOW, HIGH, DUAL)
    out.token_losses.sum().backward()
    torch.testing.assert_close(out.token_losses, expected_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, expected_grad, rtol=1e-12, atol=1e-12)
    flat = [b for row in branches for b in row if b != "pad"]
    assert float(out.stats["clip_fraction"]) == pytest.approx((flat.count("high") + flat.count("low")) / len(flat))
    assert float(out.stats["dual_clip_fraction"]) == pytest.approx(flat.count("dual") / len(flat))


def test_the_wide_batches_reach_every_branch():
    seen = set()
    for seed in range(10):
        seen |= {b for row in literal_gppo(*batch(seed, scale=3.0))[2] for b in row}
    assert seen == {"pad", "dual", "high", "low", "ratio"}


def test_clipped_tokens_keep_a_bounded_gradient_where_ppo_has_none():
    # A > 0 and r = 2 (above 1 + 0.28); A < 0 and r = 0.5 (below 1 - 0.2); A < 0 and r = 20 (past c).
    log_ratio = torch.tensor([[math.log(2.0), math.log(0.5), math.log(20.0)]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, -1.0]], dtype=torch.float64)
    lp = log_ratio.clone().requires_grad_()
    out = gppo_token_losses(lp, torch.zeros_like(lp), advantages, torch.ones(1, 3, dtype=torch.bool))
    out.token_losses.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.28, 0.8, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(out.token_losses.detach(), torch.tensor([[-1.28, 0.8, 10.0]], dtype=torch.float64))
    assert out.keep_mask.tolist() == [[True, True, False]]


@pytest.mark.parametrize("bad", [dict(clip_ratio_low=1.0), dict(clip_ratio_high=-0.1), dict(clip_ratio_c=1.0)])
def test_bad_clip_settings_are_refused(bad):
    log_probs, behaviour, advantages, mask = batch(0)
    with pytest.raises(ValueError, match="clip_ratio"):
        gppo_token_losses(log_probs, behaviour, advantages, mask, **bad)


def _config(loss_mode: str, mask):
    from m2po.verl_integration.config import actor_config

    config = dataclasses.replace(actor_config(loss_mode), clip_ratio_low=LOW, clip_ratio_high=HIGH, clip_ratio_c=DUAL)
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
    return config


@pytest.mark.parametrize("seed", range(4))
def test_registered_gppo_has_the_value_of_verls_dual_clip_ppo_and_keeps_clipped_gradients(seed):
    import verl  # noqa: F401  (the plugin registers the losses)
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    log_probs, behaviour, advantages, mask = (t.float() if t.is_floating_point() else t for t in batch(seed, scale=1.0))
    results = {}
    for mode in ("gppo", "vanilla"):
        lp = log_probs.clone().requires_grad_()
        loss, metrics = get_policy_loss_fn(mode)(
            old_log_prob=behaviour, log_prob=lp, advantages=advantages, response_mask=mask,
            loss_agg_mode="token-mean", config=_config(mode, mask), rollout_is_weights=None,
        )
        loss.backward()
        results[mode] = (loss.detach(), lp.grad, metrics)
    torch.testing.assert_close(results["gppo"][0], results["vanilla"][0])
    assert results["gppo"][2]["actor/pg_clipfrac"] == results["gppo"][2]["actor/gppo/clip_fraction"] > 0
    # PPO's clipped tokens have zero gradient; GPPO's do not, and elsewhere the two agree.
    _, expected_grad, branches = literal_gppo(*(t.double() if t.is_floating_point() else t for t in (log_probs, behaviour, advantages, mask)))
    clipped = torch.tensor([[b in ("high", "low") for b in row] for row in branches])
    assert (results["vanilla"][1][clipped] == 0).all() and (results["gppo"][1][clipped] != 0).all()
    torch.testing.assert_close(results["gppo"][1][~clipped], results["vanilla"][1][~clipped])
    torch.testing.assert_close(results["gppo"][1], (expected_grad / mask.sum()).float())
