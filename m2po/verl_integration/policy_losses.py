"""verl-signature wrappers around `m2po.algorithm`, registered in verl's policy-loss registry.

verl calls a policy loss once per micro-batch (`workers/utils/losses.py::ppo_loss`) with padded
`(micro_batch, response_len)` tensors. With `policy_loss.m2_scope=mini_batch` (the default) M2PO's cut
is decided beforehand over the whole optimizer mini-batch on every data-parallel rank
(`minibatch_scope`) and the loss applies its slice; with `m2_scope=micro_batch` the loss decides it
over the micro-batch it is handed, as the authors' fork and AReaL do. Aggregation goes through verl's
own `agg_loss` with `config.global_batch_info`, so the micro-batch and data-parallel normalisation is
exactly that of verl's vanilla loss.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss

from m2po.algorithm import (
    TokenLosses,
    cut_inputs,
    decoupled_cut_inputs,
    decoupled_m2po_token_losses,
    gppo_token_losses,
    m2po_token_losses,
    no_trust_region_token_losses,
    second_moment_keep_mask,
    stats_to_floats,
    topr_token_losses,
)
from m2po.verl_integration.behaviour_ratio import CORRECTION_KEY, UNTRUNCATED_IS_THRESHOLD, proximal_behaviour_log_ratio
from m2po.verl_integration.minibatch_scope import SCOPE_KEY, SUPPORTED_STRATEGIES, current_cut, m2po_settings, scope_of

logger = logging.getLogger(__name__)

METRIC_PREFIX = "actor/m2po/"
_warned_default_config = False


def _policy_loss_value(config: Any, key: str):
    """`config.policy_loss.<key>`, or None where the actor config has no such key."""
    policy_loss = getattr(config, "policy_loss", None)
    return policy_loss.get(key, None) if policy_loss is not None else None


def _m2po_params(config: Any) -> tuple[float, str]:
    """(m2_threshold, variant) from the actor config; paper defaults when not configured."""
    policy_loss = getattr(config, "policy_loss", None)
    threshold, variant = m2po_settings(policy_loss)
    if _policy_loss_value(config, "m2_threshold") is None or _policy_loss_value(config, "m2po_variant") is None:
        global _warned_default_config
        if not _warned_default_config:
            logger.warning(
                "loss_mode=m2po but actor.policy_loss is not an M2POPolicyLossConfig; using the paper "
                "defaults m2_threshold=%s, m2po_variant=%s. Set actor_rollout_ref.actor.policy_loss._target_="
                "m2po.verl_integration.config.M2POPolicyLossConfig (configs/m2po_trainer.yaml does) to change them.",
                threshold,
                variant,
            )
            _warned_default_config = True
    return threshold, variant


def _minibatch_cut(config: Any):
    """The cut decided over this micro-batch's mini-batch (`m2_scope=mini_batch` in verl's FSDP actor), or
    None where this call is the scope: `m2_scope=micro_batch`, or a direct call with a whole mini-batch
    (the CPU testbed, the benchmarks)."""
    cut = current_cut()
    scope = scope_of(getattr(config, "policy_loss", None))
    strategy = getattr(config, "strategy", None)
    if cut is None and scope == "mini_batch" and strategy is not None and strategy not in SUPPORTED_STRATEGIES:
        raise RuntimeError(
            f"{SCOPE_KEY}=mini_batch, but the actor's strategy {strategy!r} does not decide the mini-batch's cut "
            f"(only {' and '.join(SUPPORTED_STRATEGIES)} do, m2po.verl_integration.minibatch_scope): set "
            f"{SCOPE_KEY}=micro_batch to take Algorithm 1 over each micro-batch"
        )
    return cut


def _algorithm_arguments(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights) -> dict:
    """verl's argument names mapped to `m2po.algorithm`'s."""
    return {
        "log_probs": log_prob,
        "behaviour_log_probs": old_log_prob,
        "advantages": advantages,
        "response_mask": response_mask,
        "importance_weights": rollout_is_weights,
    }


def _aggregate(token_losses: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str, config: Any) -> torch.Tensor:
    """verl's own `agg_loss` with the global batch info: the loss scale of verl's vanilla loss."""
    global_batch_info = getattr(config, "global_batch_info", None) or {}
    return agg_loss(loss_mat=token_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **global_batch_info)


def _to_verl(
    out: TokenLosses, response_mask: torch.Tensor, loss_agg_mode: str, config: Any
) -> tuple[torch.Tensor, dict[str, float]]:
    loss = _aggregate(out.token_losses, response_mask, loss_agg_mode, config)
    stats = stats_to_floats(out.stats)
    metrics = {METRIC_PREFIX + name: value for name, value in stats.items()}
    # verl's standard keys, so dashboards compare M2PO with clipped GRPO directly: the fraction of
    # tokens whose gradient the trust region removed (masked, or PPO-clipped in the decoupled variant).
    metrics["actor/ppo_kl"] = stats["ppo_kl"]
    metrics["actor/pg_clipfrac"] = stats["masked_fraction"] + stats.get("clip_fraction", 0.0)
    return loss, metrics


def _clip_ratios(config: Any) -> tuple[float, float, float]:
    """PPO clip range and dual-clip bound from the actor config, read as verl's vanilla loss reads them."""
    clip_ratio = getattr(config, "clip_ratio", 0.2)
    low = getattr(config, "clip_ratio_low", None)
    high = getattr(config, "clip_ratio_high", None)
    return (
        clip_ratio if low is None else low,
        clip_ratio if high is None else high,
        getattr(config, "clip_ratio_c", 3.0),
    )


def _decoupled_token_losses(
    old_log_prob, log_prob, advantages, response_mask, rollout_is_weights, threshold, config, name="m2po_variant=decoupled",
    m2_keep_mask=None,
):
    """AReaL's decoupled M2PO (decoupled PPO with `threshold=inf`) in verl's decoupled mode: `old_log_prob`
    is the proximal policy's, and `rollout_is_weights` (token level, untruncated) are `pi_prox / pi_behav`."""
    if rollout_is_weights is None:
        raise ValueError(
            f"{name} reads log(pi_prox / pi_behav) from verl's rollout_is_weights, which this micro-batch does "
            f"not carry: set {CORRECTION_KEY}.rollout_is=token, {CORRECTION_KEY}.rollout_is_threshold="
            f"{UNTRUNCATED_IS_THRESHOLD:g} and bypass_mode=false, with an asynchronous trainer or "
            "m2po.stale.recompute_proximal=true"
        )
    if (response_mask & ~(rollout_is_weights > 0)).any():
        raise ValueError(
            f"{name} got rollout_is_weights <= 0 (or NaN) on valid tokens: the weights must be "
            f"pi_prox / pi_behav untruncated (no IcePop band, {CORRECTION_KEY}.rollout_is_threshold="
            f"{UNTRUNCATED_IS_THRESHOLD:g})"
        )
    low, high, dual = _clip_ratios(config)
    return decoupled_m2po_token_losses(
        log_probs=log_prob,
        proximal_log_probs=old_log_prob,
        proximal_behaviour_log_ratio=proximal_behaviour_log_ratio(rollout_is_weights, response_mask),
        advantages=advantages,
        response_mask=response_mask,
        m2_threshold=threshold,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=dual,
        behaviour_weight_cap=_policy_loss_value(config, "behaviour_weight_cap"),
        denominator=_policy_loss_value(config, "decoupled_denominator") or "valid",
        m2_keep_mask=m2_keep_mask,
    )


@register_policy_loss("m2po")
def compute_policy_loss_m2po(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """M2PO policy loss (verl `loss_mode=m2po`).

    Args:
        old_log_prob: `(micro_batch, response_len)` behaviour log-probs (the policy that
            generated the rollout, however stale); for `m2po_variant=decoupled`, the proximal
            policy's (verl's decoupled mode).
        log_prob: `(micro_batch, response_len)` current policy log-probs.
        advantages: `(micro_batch, response_len)`.
        response_mask: `(micro_batch, response_len)` bool.
        loss_agg_mode: verl's aggregation mode (paper: "token-mean").
        config: the actor config; `config.policy_loss` an `M2POPolicyLossConfig`.
        rollout_is_weights: optional rollout-correction weights, multiplied into the token loss; for
            `m2po_variant=decoupled`, required: `pi_prox / pi_behav` per token, untruncated.

    Returns:
        (scalar loss, metrics with `actor/m2po/*`, `actor/ppo_kl`, `actor/pg_clipfrac`).
    """
    threshold, variant = _m2po_params(config)
    cut = _minibatch_cut(config)
    keep_mask = None if cut is None else cut.keep_mask
    if variant == "decoupled":
        out = _decoupled_token_losses(
            old_log_prob, log_prob, advantages, response_mask, rollout_is_weights, threshold, config,
            m2_keep_mask=keep_mask,
        )
        cut_over = None
        if keep_mask is not None:
            staleness = decoupled_cut_inputs(proximal_behaviour_log_ratio(rollout_is_weights, response_mask), response_mask)
            cut_over = (staleness, response_mask, response_mask)
        return _with_cut_metrics(_to_verl(out, response_mask, loss_agg_mode, config), cut, threshold, cut_over)
    out = m2po_token_losses(
        **_algorithm_arguments(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights),
        m2_threshold=threshold,
        variant=variant,
        keep_mask=keep_mask,
        log_ratio_cap=None if cut is None else cut.log_ratio_cap,
    )
    cut_over = None
    if keep_mask is not None:
        cut_over = (*cut_inputs(log_prob.detach(), old_log_prob, advantages, response_mask), response_mask)
    return _with_cut_metrics(_to_verl(out, response_mask, loss_agg_mode, config), cut, threshold, cut_over)


def _with_cut_metrics(result, cut, threshold: float, cut_over=None):
    """Where the cut was decided over the mini-batch: its own statistics (`actor/m2po/cut_*`) and,
    given `cut_over = (log_ratio, candidates, response_mask)` of this micro-batch,
    `actor/m2po/micro_scope_differ_fraction`: the fraction of its valid tokens that Algorithm 1 over the
    micro-batch alone (`m2_scope=micro_batch`) would have masked differently."""
    loss, metrics = result
    if cut is None:
        return loss, metrics
    metrics.update({METRIC_PREFIX + name: value for name, value in (cut.metrics or {}).items()})
    if cut_over is not None and cut.keep_mask is not None:
        log_ratio, candidates, response_mask = cut_over
        own = second_moment_keep_mask(log_ratio, candidates, threshold) | ~candidates
        differ = (own != (cut.keep_mask | ~candidates)) & response_mask
        metrics[METRIC_PREFIX + "micro_scope_differ_fraction"] = float(differ.sum() / response_mask.sum().clamp(min=1))
    return loss, metrics


@register_policy_loss("decoupled_ppo")
def compute_policy_loss_decoupled_ppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """AReaL's decoupled PPO (Fu et al. 2025, arXiv 2505.24298, its decoupled PPO objective): PPO clip of `pi_theta / pi_prox`
    times the behaviour weight `w = pi_prox / pi_behav`, tokens with `w` above
    `policy_loss.behaviour_weight_cap` dropped: the decoupled M2PO loss without its mask (tau = inf).

    Needs verl's decoupled mode: `old_log_prob` the proximal log-probs and `rollout_is_weights`
    untruncated token weights (an asynchronous trainer with bypass_mode=false, or `m2po_stale` with
    `m2po.stale.recompute_proximal=true`). Metrics `actor/m2po/*` (the M2 of `log w`, nothing masked),
    `actor/ppo_kl` and `actor/pg_clipfrac` (PPO-clipped tokens).
    """
    out = _decoupled_token_losses(
        old_log_prob, log_prob, advantages, response_mask, rollout_is_weights, math.inf, config, name="loss_mode=decoupled_ppo"
    )
    return _to_verl(out, response_mask, loss_agg_mode, config)


@register_policy_loss("no_trust_region")
def compute_policy_loss_no_trust_region(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance-weighted policy gradient with no trust region (paper's "GRPO no TR").

    Same arguments and metrics as `compute_policy_loss_m2po` (the masked fraction is always 0);
    logging the same M2 statistics lets a run show the second moment that M2PO would constrain.
    """
    out = no_trust_region_token_losses(
        **_algorithm_arguments(old_log_prob, log_prob, advantages, response_mask, rollout_is_weights)
    )
    return _to_verl(out, response_mask, loss_agg_mode, config)


@register_policy_loss("topr")
def compute_policy_loss_topr(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TOPR, Tapered Off-Policy REINFORCE (arXiv 2503.14286): see `m2po.algorithm.baselines`.

    Metrics: `actor/topr/*`, `actor/ppo_kl`, and `actor/pg_clipfrac` = the fraction of tokens whose
    weight the taper cut below 1 (negative-advantage responses more likely now than when generated).
    """
    out = topr_token_losses(log_prob, old_log_prob, advantages, response_mask)
    return _baseline_to_verl(out, "topr", "truncated_fraction", response_mask, loss_agg_mode, config, rollout_is_weights)


@register_policy_loss("gppo")
def compute_policy_loss_gppo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GPPO, gradient-preserving clipping (Klear-Reasoner, arXiv 2508.07629): see `m2po.algorithm.baselines`.

    The clip range and dual-clip bound are the actor's `clip_ratio_low`, `clip_ratio_high` and
    `clip_ratio_c`, read as verl's vanilla loss reads them. Metrics: `actor/gppo/*`, `actor/ppo_kl`,
    and `actor/pg_clipfrac` = the fraction of tokens on a clipped branch (their gradient is bounded, not removed).
    """
    low, high, dual = _clip_ratios(config)
    out = gppo_token_losses(log_prob, old_log_prob, advantages, response_mask, low, high, dual)
    return _baseline_to_verl(out, "gppo", "clip_fraction", response_mask, loss_agg_mode, config, rollout_is_weights)


def _baseline_to_verl(
    out: TokenLosses, name: str, clip_stat: str, response_mask, loss_agg_mode, config, rollout_is_weights
) -> tuple[torch.Tensor, dict[str, float]]:
    """A baseline's token losses (times verl's rollout-correction weights, if any) aggregated as verl's
    vanilla loss, with its stats as `actor/<name>/*` and `clip_stat` as `actor/pg_clipfrac`."""
    token_losses = out.token_losses if rollout_is_weights is None else out.token_losses * rollout_is_weights
    loss = _aggregate(token_losses, response_mask, loss_agg_mode, config)
    stats = stats_to_floats(out.stats)
    metrics = {f"actor/{name}/{key}": value for key, value in stats.items()}
    metrics["actor/ppo_kl"] = stats["ppo_kl"]
    metrics["actor/pg_clipfrac"] = stats[clip_stat]
    return loss, metrics

