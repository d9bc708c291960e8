"""Off-policy baselines the paper compares M2PO with, as plain PyTorch losses.

TOPR, Tapered Off-Policy REINFORCE (Le Roux, Bellemare et al. 2025, arXiv 2503.14286, section 3):
positive examples get a plain REINFORCE (supervised) update with no importance ratio, negative
examples the trajectory ratio `pi(tau) / mu(tau)` truncated to [0, 1]; the ratio is a constant
weight (stop-gradient) on `R log pi(tau)`:

    grad J = sum_{R >= 0} mu(tau) R grad log pi(tau) + sum_{R < 0} mu(tau) [pi(tau)/mu(tau)]_0^1 R grad log pi(tau)

Here R is the (group-normalised) advantage and `log pi(tau)` the sum of the response's token
log-probs, so each token gets `-sg(w) A log pi(token)` and verl's `loss_agg_mode` aggregates them.

GPPO, Gradient-Preserving clipping Policy Optimization (Su et al. 2025, Klear-Reasoner, arXiv
2508.07629, section 2.2; released loss `compute_gppo_loss` in Kwai-Klear/KlearReasoner at commit
e0f7bb1, `verl/trainer/ppo/core_algos.py`): PPO's clipped objective with the same value, but a token
outside the clip range keeps a bounded gradient instead of none. The clipped ratio is written
`bound * r / sg(r)`, whose value is `bound` and whose gradient is `bound * grad log pi`:

    L_t = max(-A r, -A clip_sg(r))        clip_sg(r) = (1-eps_l) r/sg(r) | r | (1+eps_h) r/sg(r)
    L_t = min(L_t, -A c)  where A < 0     (dual clip, as the released loss)

so a positive-advantage token above `1+eps_h` is pushed with weight `1+eps_h` (not 0), a
negative-advantage token below `1-eps_l` with weight `1-eps_l`, and a negative-advantage token
above `c` gets no gradient (dual clip). Every value equals verl's vanilla (dual-clip PPO) loss.
"""

from __future__ import annotations

import torch

from m2po.algorithm.losses import TokenLosses, validate_policy_inputs

__all__ = ["gppo_token_losses", "topr_token_losses"]


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


def gppo_token_losses(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float = 10.0,
) -> TokenLosses:
    """Per-token GPPO loss (see the module docstring); defaults are Klear-Reasoner's released script.

    Args:
        log_probs: `(batch, response_len)` log pi_theta of the taken tokens (requires grad).
        behaviour_log_probs: `(batch, response_len)` log pi_behav recorded at generation.
        advantages: `(batch, response_len)`.
        response_mask: `(batch, response_len)` bool.
        clip_ratio_low, clip_ratio_high: eps_l, eps_h of the clip range `[1-eps_l, 1+eps_h]`.
        clip_ratio_c: the dual-clip bound (> 1) on negative-advantage tokens.

    Returns:
        TokenLosses (keep_mask all True: GPPO drops no token's gradient except past the dual clip);
        stats `clip_fraction` (valid tokens on a clipped branch, gradient bounded but kept),
        `dual_clip_fraction` (valid tokens past the dual clip, no gradient), `ppo_kl`.
    """
    validate_policy_inputs(log_probs, behaviour_log_probs, advantages, response_mask)
    if not (0 <= clip_ratio_low < 1 and clip_ratio_high >= 0):
        raise ValueError(f"GPPO needs 0 <= clip_ratio_low < 1 and clip_ratio_high >= 0, got {clip_ratio_low}, {clip_ratio_high}")
    if not clip_ratio_c > 1:
        raise ValueError(f"GPPO's dual-clip bound clip_ratio_c must be > 1, got {clip_ratio_c}")
    f64 = torch.float64
    log_ratio = torch.where(response_mask, log_probs - behaviour_log_probs, 0.0)
    ratio = log_ratio.exp()
    # bound * r / sg(r): the bound's value with the gradient of `bound * log pi`.
    gradient_carrier = ratio / ratio.detach()
    low_clipped = (1 - clip_ratio_low) * gradient_carrier
    high_clipped = (1 + clip_ratio_high) * gradient_carrier
    clipped_ratio = torch.where(ratio < 1 - clip_ratio_low, low_clipped, torch.where(ratio > 1 + clip_ratio_high, high_clipped, ratio))
    unclipped_losses = -advantages * ratio
    clipped_losses = -advantages * clipped_ratio
    on_clipped_branch = clipped_losses > unclipped_losses
    losses = torch.where(on_clipped_branch, clipped_losses, unclipped_losses)
    dual_bound = -advantages * clip_ratio_c
    past_dual_clip = (advantages < 0) & (losses > dual_bound)
    losses = torch.where(past_dual_clip, dual_bound, losses)
    token_losses = torch.where(response_mask, losses, 0.0)
    valid = response_mask.sum().to(f64).clamp(min=1)
    stats = {
        "clip_fraction": (response_mask & on_clipped_branch & ~past_dual_clip).sum().to(f64) / valid,
        "dual_clip_fraction": (response_mask & past_dual_clip).sum().to(f64) / valid,
        "ppo_kl": -log_ratio.detach().sum(dtype=f64) / valid,
    }
    return TokenLosses(token_losses=token_losses, keep_mask=~past_dual_clip | ~response_mask, stats=stats)
