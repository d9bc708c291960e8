"""Off-policy baselines the paper compares M2PO with, as plain PyTorch losses.

TOPR, Tapered Off-Policy REINFORCE (Le Roux, Bellemare et al. 2025, arXiv 2503.14286, section 3):
positive examples get a plain REINFORCE (supervised) update with no importance ratio, negative
examples the trajectory ratio `pi(tau) / mu(tau)` truncated to [0, 1]; the ratio is a constant
weight (stop-gradient) on `R log pi(tau)`:

    grad J = sum_{R >= 0} mu(tau) R grad log pi(tau) + sum_{R < 0} mu(tau) [pi(tau)/mu(tau)]_0^1 R grad log pi(tau)

Here R is the (group-normalised) advantage and `log pi(tau)` the sum of the response's token
log-probs, so each token gets `-sg(w) A log pi(token)` and verl's `loss_agg_mode` aggregates them.
"""

from __future__ import annotations

import torch

from m2po.algorithm.losses import TokenLosses, validate_policy_inputs

__all__ = ["topr_token_losses"]


def topr_token_losses(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
) -> TokenLosses:
    """Per-token TOPR loss `-sg(w) * A * log pi_theta`.

    `w = 1` on tokens with `A >= 0`; on tokens with `A < 0`, `w = min(1, pi_theta(y)/pi_behav(y))`,
    the response's whole-sequence ratio `exp(sum over its valid tokens of log r)`.

    Args:
        log_probs: `(batch, response_len)` log pi_theta of the taken tokens (requires grad).
        behaviour_log_probs: `(batch, response_len)` log pi_behav recorded at generation.
        advantages: `(batch, response_len)`; the sign decides each token's branch.
        response_mask: `(batch, response_len)` bool.

    Returns:
        TokenLosses (keep_mask all True: TOPR drops no token); stats `truncated_fraction` (valid
        tokens whose weight is below 1), `negative_weight_mean` (mean `w` over valid `A < 0` tokens),
        `sequence_log_ratio_mean`, `ppo_kl`.
    """
    validate_policy_inputs(log_probs, behaviour_log_probs, advantages, response_mask)
    f64 = torch.float64
    log_ratio = torch.where(response_mask, log_probs.detach() - behaviour_log_probs, 0.0)
    sequence_log_ratio = log_ratio.sum(dim=-1, dtype=f64, keepdim=True)  # (batch, 1)
    tapered = sequence_log_ratio.clamp(max=0.0).exp().to(log_probs.dtype)  # [pi/mu]_0^1, no overflow
    negative = response_mask & (advantages < 0)
    weight = torch.where(negative, tapered, torch.ones_like(tapered))
    token_losses = torch.where(response_mask, -weight * advantages * log_probs, 0.0)
    valid = response_mask.sum().to(f64).clamp(min=1)
    stats = {
        "truncated_fraction": (negative & (weight < 1)).sum().to(f64) / valid,
        "negative_weight_mean": torch.where(negative, weight, 0.0).sum(dtype=f64) / negative.sum().to(f64).clamp(min=1),
        "sequence_log_ratio_mean": sequence_log_ratio[response_mask.any(dim=-1)].mean()
        if response_mask.any()
        else torch.zeros((), dtype=f64),
        "ppo_kl": -log_ratio.sum(dtype=f64) / valid,
    }
    return TokenLosses(token_losses=token_losses, keep_mask=torch.ones_like(response_mask), stats=stats)
