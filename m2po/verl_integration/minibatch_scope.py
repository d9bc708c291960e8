"""M2PO's cut over the whole optimizer mini-batch inside verl's FSDP actor (`policy_loss.m2_scope`).

verl calls the policy loss once per micro-batch on each data-parallel rank, so a loss that decides
Algorithm 1's cut by itself decides it over one micro-batch (`m2_scope=micro_batch`): which tokens
are masked then depends on `ppo_max_token_len_per_gpu` / `ppo_micro_batch_size_per_gpu`, on the
number of ranks and on dynamic batching's packing. With `m2_scope=mini_batch` (the default), before
the first backward of each mini-batch the FSDP engine's `forward_backward_batch` is preceded by:

1. a forward without gradient over all of this rank's micro-batches at the current weights (the
   weights the mini-batch is trained at: verl steps the optimizer once per mini-batch), micro-batched
   exactly as the training pass is; the decoupled variant needs none (its ratio is data);
2. the cut of Algorithm 1 (or the clip variant's cap) over every candidate of the mini-batch on all
   data-parallel ranks together (`m2po.algorithm.minibatch_mask`: sums all-reduced, only the tokens
   above tau gathered), ties broken by position in the mini-batch's row order, rank by rank;
3. the keep-mask stored on the mini-batch as a field shaped like `response_mask` (the cap as one
   value per row), so verl's own micro-batching hands each micro-batch its slice; the loss reads it
   through `current_cut()`. The loss, its denominator and verl's aggregation are unchanged.

A loss that is configured for the mini-batch scope but is called by verl without a cut (another
engine, or an FSDP engine whose `forward_backward_batch` is not this one) raises instead of quietly
deciding per micro-batch (`policy_losses.compute_policy_loss_m2po`). Direct calls outside verl's
workers (the CPU testbed, benchmarks) hand the loss a whole mini-batch at once: that call is the scope.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import wrapt

from m2po.algorithm import (
    PAPER_M2_THRESHOLD,
    cut_inputs,
    decoupled_cut_inputs,
    minibatch_clip_bound,
    minibatch_keep_masks,
)
from m2po.verl_integration.behaviour_ratio import proximal_behaviour_log_ratio

SCOPES = ("mini_batch", "micro_batch")
DEFAULT_SCOPE = "mini_batch"
SCOPE_KEY = "actor_rollout_ref.actor.policy_loss.m2_scope"
# The actor strategies whose engine is `FSDPEngine` (its forward_backward_batch is the one wrapped here).
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
KEEP_FIELD = "m2po_keep_mask"
CAP_FIELD = "m2po_log_ratio_cap"
STATS_FIELD = "m2po_minibatch_stats"
# What STATS_FIELD holds per row (the same on every row of every rank), logged as actor/m2po/<name>. No
# "min" or "max" in a name: verl's reduce_metrics takes the min (max) over the updates of any key holding it.
MINIBATCH_STATS = ("cut_m2_after", "cut_masked_fraction")


@dataclass(frozen=True)
class MiniBatchCut:
    """This micro-batch's slice of the mini-batch's cut: `keep_mask` `(micro_batch, response_len)` bool
    (variants "mask" and "decoupled"), or `log_ratio_cap` 0-dim (variant "clip")."""

    keep_mask: torch.Tensor | None = None
    log_ratio_cap: torch.Tensor | None = None
    metrics: dict[str, float] | None = None  # MINIBATCH_STATS over the whole mini-batch, all ranks


_current_cut: ContextVar[MiniBatchCut | None] = ContextVar("m2po_minibatch_cut", default=None)


def current_cut() -> MiniBatchCut | None:
    """The cut decided over the mini-batch that the loss being computed belongs to; None outside one."""
    return _current_cut.get()


def scope_of(policy_loss) -> str:
    """`m2_scope` of a policy-loss config; the default where it has none (verl's plain `PolicyLossConfig`)."""
    return (policy_loss.get("m2_scope", None) if policy_loss is not None else None) or DEFAULT_SCOPE


def wants_minibatch_cut(actor_config) -> bool:
    """Whether this actor config's loss takes its cut over the mini-batch (loss_mode m2po, m2_scope mini_batch)."""
    policy_loss = getattr(actor_config, "policy_loss", None)
    if policy_loss is None or policy_loss.get("loss_mode", None) != "m2po":
        return False
    return scope_of(policy_loss) == "mini_batch"


def m2po_settings(policy_loss) -> tuple[float, str]:
    """(tau, variant) as the loss reads them: the paper's defaults where `policy_loss` is missing or verl's
    plain `PolicyLossConfig` (the loss warns about that once)."""
    tau = policy_loss.get("m2_threshold", None) if policy_loss is not None else None
    variant = policy_loss.get("m2po_variant", None) if policy_loss is not None else None
    return (PAPER_M2_THRESHOLD if tau is None else tau), (variant or "mask")


def scope_config_errors(config) -> list[str]:
    """Start-up: `m2_scope=mini_batch` where it cannot work (not an FSDP strategy, or distillation's loss)."""
    from omegaconf import OmegaConf

    if not wants_minibatch_cut(OmegaConf.select(config, "actor_rollout_ref.actor", default=None)):
        return []
    errors = []
    strategy = OmegaConf.select(config, "actor_rollout_ref.actor.strategy", default=None)
    if strategy not in SUPPORTED_STRATEGIES:
        errors.append(
            f"{SCOPE_KEY}=mini_batch decides M2PO's cut over the mini-batch inside verl's FSDP engine, and "
            f"actor_rollout_ref.actor.strategy={strategy!r} is not one ({' or '.join(SUPPORTED_STRATEGIES)}): set "
            f"{SCOPE_KEY}=micro_batch (Algorithm 1 per micro-batch, as the authors' fork and AReaL)"
        )
    if OmegaConf.select(config, "distillation.enabled", default=False):
        errors.append(
            f"{SCOPE_KEY}=mini_batch works with verl's ppo_loss, not with distillation.enabled=true's loss: set "
            f"{SCOPE_KEY}=micro_batch"
        )
    return errors


def _padded(data, *fields):
    """`fields` of a verl micro- or mini-batch as padded `(batch, response_len)` tensors, as verl's `ppo_loss` pads them."""
    return data.select(*fields).to_padded_tensor()


def _like_response_mask(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A padded `(batch, response_len)` tensor in `response_mask`'s layout (dense, or jagged with its offsets)."""
    if not response_mask.is_nested:
        return values
    offsets = response_mask.offsets()
    lengths = offsets.diff().tolist()
    flat = torch.cat([row[:n] for row, n in zip(values, lengths)])
    return torch.nested.nested_tensor_from_jagged(flat, offsets=offsets)


def current_log_probs(engine, data) -> torch.Tensor:
    """log pi_theta of every response token of this rank's mini-batch at the current weights, padded
    `(batch, response_len)`: verl's own forward, micro-batched as the training pass will be, no gradient."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    probe = data.copy()  # shallow: the flags below stay off the training pass
    tu.assign_non_tensor(probe, calculate_entropy=False, calculate_sum_pi_squared=False)
    with torch.no_grad():
        output = engine.forward_backward_batch(probe, loss_function=None, forward_only=True)
    return no_padding_2_padding(output["model_output"]["log_probs"], data)


def decide_cut(engine, data, actor_config) -> None:
    """Decide the mini-batch's cut on every data-parallel rank together and store it on `data`
    (`KEEP_FIELD`, or `CAP_FIELD` for the clip variant)."""
    tau, variant = m2po_settings(actor_config.policy_loss)
    group = engine.get_data_parallel_group()
    if variant == "decoupled":
        if "rollout_is_weights" not in data.keys():
            return  # the loss names what is missing, with the fix
        padded = _padded(data, "response_mask", "rollout_is_weights")
        mask = padded["response_mask"].bool()
        log_ratio = decoupled_cut_inputs(proximal_behaviour_log_ratio(padded["rollout_is_weights"], mask), mask)
        candidates = mask
    else:
        log_probs = current_log_probs(engine, data)
        padded = _padded(data, "response_mask", "old_log_probs", "advantages")
        mask = padded["response_mask"].bool()
        log_ratio, candidates = cut_inputs(log_probs, padded["old_log_probs"], padded["advantages"], mask)
    if variant == "clip":
        cap = minibatch_clip_bound([log_ratio], [candidates], tau, group=group)
        data[CAP_FIELD] = cap.expand(mask.shape[0]).clone()
        return
    keep = minibatch_keep_masks([log_ratio], [candidates], tau, group=group)[0]
    data[KEEP_FIELD] = _like_response_mask(keep, data["response_mask"])
    data[STATS_FIELD] = _minibatch_stats(log_ratio, candidates, keep, mask, group).expand(mask.shape[0], -1).clone()


def _minibatch_stats(log_ratio, candidates, keep, mask, group) -> torch.Tensor:
    """`MINIBATCH_STATS` over every rank's share: the mean `d**2` over the candidates kept (what Algorithm 1
    bounds by tau) and the fraction of valid tokens masked."""
    kept = candidates & keep
    sums = torch.stack([
        torch.where(kept, log_ratio.detach().double().square(), 0.0).sum(),
        kept.sum().double(),
        (candidates & ~keep).sum().double(),
        mask.sum().double(),
    ])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    return torch.stack([sums[0] / sums[1].clamp(min=1), sums[2] / sums[3].clamp(min=1)])


def _loss_with_cut(loss_function, model_output, data, dp_group=None):
    """verl's loss for one micro-batch, with that micro-batch's slice of the mini-batch's cut in scope."""
    if KEEP_FIELD in data.keys():
        stats = data[STATS_FIELD]
        metrics = dict(zip(MINIBATCH_STATS, stats[0].tolist())) if stats.shape[0] else None
        cut = MiniBatchCut(keep_mask=_padded(data, "response_mask", KEEP_FIELD)[KEEP_FIELD].bool(), metrics=metrics)
    elif CAP_FIELD in data.keys():
        caps = data[CAP_FIELD]
        cut = MiniBatchCut(log_ratio_cap=caps[0] if caps.numel() else torch.tensor(float("inf"), dtype=torch.float64))
    else:
        cut = None
    token = _current_cut.set(cut)
    try:
        return loss_function(model_output=model_output, data=data, dp_group=dp_group)
    finally:
        _current_cut.reset(token)


def _actor_config_of(loss_function):
    keywords = getattr(loss_function, "keywords", None) or {}
    return keywords.get("config")


def _forward_backward_batch(wrapped, instance, args, kwargs):
    """`FSDPEngine.forward_backward_batch(data, loss_function, forward_only=False)`, preceded by the
    mini-batch's cut when the actor's loss asks for one."""

    def bind(data, loss_function, forward_only=False):
        return data, loss_function, forward_only

    data, loss_function, forward_only = bind(*args, **kwargs)
    actor_config = _actor_config_of(loss_function) if loss_function is not None else None
    if forward_only or actor_config is None or not wants_minibatch_cut(actor_config):
        return wrapped(*args, **kwargs)
    from verl.workers.utils.losses import ppo_loss

    from m2po.verl_integration.verl_internals import check_verl_version

    check_verl_version(f"{SCOPE_KEY}=mini_batch")
    if getattr(loss_function, "func", None) is not ppo_loss:
        raise ValueError(
            f"{SCOPE_KEY}=mini_batch needs verl's ppo_loss as the actor's loss (got {loss_function!r}, e.g. "
            f"distillation); set {SCOPE_KEY}=micro_batch"
        )
    decide_cut(instance, data, actor_config)
    return wrapped(data, functools.partial(_loss_with_cut, loss_function), forward_only=False)


def install_minibatch_scope_hook() -> None:
    """Wrap `FSDPEngine.forward_backward_batch` when verl's FSDP engine module is imported (idempotent)."""

    @wrapt.when_imported("verl.workers.engine.fsdp.transformer_impl")
    def _wrap(module):
        if not isinstance(module.FSDPEngine.__dict__["forward_backward_batch"], wrapt.FunctionWrapper):
            wrapt.wrap_function_wrapper(module, "FSDPEngine.forward_backward_batch", _forward_backward_batch)
