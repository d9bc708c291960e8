"""M2PO and no-trust-region policy losses on padded tensors (plain PyTorch, no verl import).

The objective of M2PO (paper eq. 5), to minimise:

    loss = -(1 / #valid tokens) * sum_i M_i * r_i * A_i,     r_i = exp(log pi_theta - log pi_behav)

with no epsilon clipping; `M_i` is the keep-mask of Algorithm 1 (variant "mask") or, in the
authors' released code (variant "clip"), a PPO clip with the bound `[exp(-cap), exp(cap)]`
solved from the same second-moment budget. Masked tokens still count in the denominator
(paper footnote 2). The `1 / #valid tokens` is `loss_agg_mode="token-mean"`; the other modes
of verl's `agg_loss` are supported too.

The "decoupled" variant (AReaL's `m2_threshold`, for asynchronous training with three policies:
behaviour, proximal, current) bounds the second moment of `log pi_prox - log pi_behav` over all valid
tokens instead, then applies decoupled PPO: a clip of `pi_theta / pi_prox` times the behaviour weight
`pi_prox / pi_behav` (`decoupled_m2po_token_losses`).

The functions here return per-token losses plus statistics; `aggregate_token_losses` turns
them into a scalar for use outside verl. The verl integration aggregates with verl's own
`agg_loss` instead (it knows the global batch size across micro-batches and ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from m2po.algorithm.masking import (
    PAPER_M2_THRESHOLD,
    check_m2_threshold,
    second_moment_clip_bound,
    second_moment_keep_mask,
    trust_region_mask,
)

__all__ = [
    "DECOUPLED_DENOMINATORS",
    "LOG_RATIO_LIMIT",
    "LOSS_AGG_MODES",
    "M2PO_VARIANTS",
    "TokenLosses",
    "aggregate_token_losses",
    "check_variant",
    "cut_inputs",
    "decoupled_cut_inputs",
    "decoupled_m2po_loss",
    "decoupled_m2po_token_losses",
    "m2po_loss",
    "m2po_token_losses",
    "no_trust_region_loss",
    "no_trust_region_token_losses",
    "stats_to_floats",
    "validate_policy_inputs",
]

# Same clamp on log r as verl's vanilla loss: exp(20) ~ 4.9e8 keeps r, r * A and their
# gradients finite in float32 whatever the log-probs.
LOG_RATIO_LIMIT = 20.0

M2PO_VARIANTS = ("mask", "clip", "decoupled")
LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def check_variant(variant: str, key: str = "m2po_variant") -> str:
    """Raise a ValueError naming `key` and the allowed values unless `variant` is one of them."""
    if variant not in M2PO_VARIANTS:
        raise ValueError(
            f"{key} must be one of {list(M2PO_VARIANTS)} "
            f"('mask' = paper Algorithm 1, 'clip' = authors' released code, 'decoupled' = AReaL's asynchronous "
            f"variant), got {variant!r}"
        )
    return variant


@dataclass
class TokenLosses:
    """Per-token policy loss and what the trust region did.

    Attributes:
        token_losses: `(batch, response_len)` loss per token (0 on padding), differentiable.
        keep_mask: `(batch, response_len)` bool, False on tokens whose gradient the trust
            region removed (masked, or clipped for the "clip" variant).
        stats: name -> 0-dim tensor (see README "Metrics"); detached.
    """

    token_losses: torch.Tensor
    keep_mask: torch.Tensor
    stats: dict[str, torch.Tensor]


def validate_policy_inputs(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    importance_weights: torch.Tensor | None = None,
    check_finite: bool = True,
) -> None:
    """Fail early, and say why, on inputs that would silently corrupt the update.

    Values on padding positions (response_mask False) are ignored. `check_finite` costs one
    host synchronisation per call.

    Raises:
        TypeError: response_mask is not bool, or log-probs are not floating point.
        ValueError: shapes differ, or a valid token has a NaN/inf log-prob, advantage or weight.
    """
    named = _named_inputs(log_probs, behaviour_log_probs, advantages, importance_weights)
    _check_structure(named, response_mask)
    if check_finite:
        _check_finite(log_probs - behaviour_log_probs, named, response_mask)


def _named_inputs(log_probs, behaviour_log_probs, advantages, importance_weights=None) -> dict[str, torch.Tensor]:
    named = {"log_probs": log_probs, "behaviour_log_probs": behaviour_log_probs, "advantages": advantages}
    if importance_weights is not None:
        named["importance_weights"] = importance_weights
    return named


def _check_structure(named: dict[str, torch.Tensor], response_mask: torch.Tensor) -> None:
    """`named`: the float inputs by name, log-probs first (see `_named_inputs`)."""
    shapes = {name: tuple(t.shape) for name, t in {**named, "response_mask": response_mask}.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"policy-loss inputs must share one (batch, response_len) shape, got {shapes}")
    if response_mask.dtype != torch.bool:
        raise TypeError(
            f"response_mask must be a bool tensor, got {response_mask.dtype}; pass response_mask.bool() "
            "if it holds 0/1 values"
        )
    for name, tensor in named.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_finite(raw_log_ratio: torch.Tensor, named: dict[str, torch.Tensor], response_mask: torch.Tensor) -> None:
    """`raw_log_ratio` is the difference of the first two (log-prob) entries of `named`."""
    # One cheap probe: a sum over the valid tokens is finite iff its terms are (short of an
    # overflow). The per-tensor count runs only when it trips, so an overflow raises nothing.
    probe = raw_log_ratio
    for tensor in list(named.values())[2:]:
        probe = probe + tensor
    if math.isfinite(torch.where(response_mask, probe, 0.0).sum().item()):
        return
    counts = {name: int((response_mask & ~torch.isfinite(t)).sum()) for name, t in named.items()}
    counts = {name: c for name, c in counts.items() if c}
    if counts:
        raise ValueError(
            f"non-finite values (NaN/inf) on valid response tokens: {counts} "
            f"(of {int(response_mask.sum())} valid tokens)"
        )


def cut_inputs(
    log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the cut of the "mask" and "clip" variants is taken over: `(log_ratio, trust_region)`.

    `log_ratio` is `log pi_theta - log pi_behav`, 0 on padding and clamped to `LOG_RATIO_LIMIT` (as the
    loss uses it); `trust_region` the candidates (`trust_region_mask`). All `(batch, response_len)`.
    The loss computes them this way, and so does a cut decided over a whole mini-batch beforehand
    (`m2po.algorithm.minibatch_mask`), so both see the same numbers.
    """
    raw_log_ratio = log_probs - behaviour_log_probs
    log_ratio = torch.where(response_mask, raw_log_ratio, 0.0).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return log_ratio, trust_region_mask(log_ratio, advantages, response_mask)


def decoupled_cut_inputs(proximal_behaviour_log_ratio: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """What the decoupled variant's mask is taken over: `log pi_prox - log pi_behav`, 0 on padding and
    clamped; `(batch, response_len)`. Its candidates are every valid token (`response_mask`)."""
    staleness_log_ratio = torch.where(response_mask, proximal_behaviour_log_ratio.detach(), 0.0)
    return staleness_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def _check_cut(name: str, value, response_mask: torch.Tensor, dtype=torch.bool) -> None:
    """A cut decided elsewhere must fit this call: a bool mask of the same shape, or a 0-dim cap."""
    if value is None:
        return
    if dtype == torch.bool:
        if value.dtype != torch.bool or value.shape != response_mask.shape:
            raise ValueError(
                f"{name} must be a bool tensor shaped like response_mask {tuple(response_mask.shape)}, "
                f"got {value.dtype} {tuple(value.shape)}"
            )
    elif value.dim() != 0:
        raise ValueError(f"{name} must be a 0-dim tensor (one cap for the whole batch), got shape {tuple(value.shape)}")


def _prepare(log_probs, behaviour_log_probs, advantages, response_mask, importance_weights, check_finite):
    """Validated `(ratio, log_ratio, second_moment, trust_region)`; `log_ratio` is clamped and
    0 on padding, so `second_moment` is too."""
    named = _named_inputs(log_probs, behaviour_log_probs, advantages, importance_weights)
    _check_structure(named, response_mask)
    if check_finite:
        _check_finite(log_probs - behaviour_log_probs, named, response_mask)
    log_ratio, trust_region = cut_inputs(log_probs, behaviour_log_probs, advantages, response_mask)
    return log_ratio.exp(), log_ratio, log_ratio.detach().square(), trust_region


def _stats(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    second_moment: torch.Tensor,
    response_mask: torch.Tensor,
    trust_region: torch.Tensor,
    keep_mask: torch.Tensor,
    cap_squared: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Statistics shared by every loss here (all 0 when no token is valid, never NaN).

    `log_ratio` and `second_moment` must be 0 on padding and `keep_mask` True there; the tokens
    not kept are trust-region tokens. After the trust region, a dropped token leaves the mean
    (mask variant, `cap_squared=None`) or counts at the cap (clip variant). Sums accumulate in
    float64: "after" is "before" minus the dropped tokens, which may dominate.
    """
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    f64 = torch.float64
    dropped = ~keep_mask
    num_valid, num_trust, num_dropped = (t.sum().to(f64) for t in (response_mask, trust_region, dropped))
    moment_sum = second_moment.sum(dtype=f64)
    trust_moment_sum = torch.where(trust_region, second_moment, 0.0).sum(dtype=f64)
    dropped_moment_sum = torch.where(dropped, second_moment, 0.0).sum(dtype=f64)
    if cap_squared is None:
        trust_after, all_after, num_trust_after, num_valid_after = (
            trust_moment_sum - dropped_moment_sum,
            moment_sum - dropped_moment_sum,
            num_trust - num_dropped,
            num_valid - num_dropped,
        )
    else:
        # Nothing dropped means an infinite cap: 0 * inf must read as 0.
        at_cap = torch.where(num_dropped > 0, num_dropped * cap_squared.to(f64), 0.0)
        trust_after, all_after, num_trust_after, num_valid_after = (
            trust_moment_sum - dropped_moment_sum + at_cap,
            moment_sum - dropped_moment_sum + at_cap,
            num_trust,
            num_valid,
        )
    valid = num_valid.clamp(min=1)
    return {
        "m2_before": trust_moment_sum / num_trust.clamp(min=1),
        "m2_after": trust_after / num_trust_after.clamp(min=1),
        "m2_all_before": moment_sum / valid,
        "m2_all_after": all_after / num_valid_after.clamp(min=1),
        "masked_fraction": num_dropped / valid,
        "trust_region_fraction": num_trust / valid,
        "ratio_mean": torch.where(response_mask, ratio, 0.0).sum(dtype=f64) / valid,
        "ratio_max": torch.where(response_mask, ratio, 0.0).amax() if ratio.numel() else ratio.new_zeros(()),
        "ppo_kl": -log_ratio.sum(dtype=f64) / valid,
    }


def m2po_token_losses(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    m2_threshold: float = PAPER_M2_THRESHOLD,
    variant: str = "mask",
    importance_weights: torch.Tensor | None = None,
    check_finite: bool = True,
    keep_mask: torch.Tensor | None = None,
    log_ratio_cap: torch.Tensor | None = None,
) -> TokenLosses:
    """Per-token M2PO loss `-M * r * A` (variant "mask") or the authors' clipped form ("clip").

    Args:
        log_probs: `(batch, response_len)` log pi_theta of the taken tokens (requires grad).
        behaviour_log_probs: `(batch, response_len)` log pi_behav recorded when the rollout was
            generated (verl's `old_log_prob`).
        advantages: `(batch, response_len)`, e.g. GRPO group-normalised outcome advantages.
        response_mask: `(batch, response_len)` bool.
        m2_threshold: tau, the second-moment budget (paper: `PAPER_M2_THRESHOLD`).
        variant: "mask" (paper Algorithm 1) or "clip" (authors' released code).
        importance_weights: optional `(batch, response_len)` per-token weights multiplied into the
            loss (verl's rollout-correction `rollout_is_weights`).
        check_finite: reject NaN/inf on valid tokens (one host sync).
        keep_mask: variant "mask": the cut decided over a larger batch this one is part of (a whole
            mini-batch, `m2po.algorithm.minibatch_keep_masks` over `cut_inputs`), `(batch, response_len)`
            bool; None: Algorithm 1 over this call's tokens.
        log_ratio_cap: variant "clip": likewise, the 0-dim cap (`minibatch_clip_bound`); None: solved
            over this call's tokens.

    Returns:
        TokenLosses; stats also hold `log_ratio_cap` for the "clip" variant (`LOG_RATIO_LIMIT`
        when no token is clipped).
    """
    tau = check_m2_threshold(m2_threshold)
    check_variant(variant)
    if variant == "decoupled":
        raise ValueError(
            "m2po_variant='decoupled' needs the proximal policy's log-probs as well: use decoupled_m2po_token_losses"
        )
    if (keep_mask is not None and variant != "mask") or (log_ratio_cap is not None and variant != "clip"):
        raise ValueError(f"variant {variant!r} takes {'log_ratio_cap' if variant == 'clip' else 'keep_mask'}, not the other")
    _check_cut("keep_mask", keep_mask, response_mask)
    _check_cut("log_ratio_cap", log_ratio_cap, response_mask, dtype=None)
    ratio, log_ratio, second_moment, trust_region = _prepare(
        log_probs, behaviour_log_probs, advantages, response_mask, importance_weights, check_finite
    )
    if variant == "mask":
        if keep_mask is None:
            keep_mask = second_moment_keep_mask(log_ratio, trust_region, tau)
        else:  # decided over a whole batch: padding and tokens outside the trust region are always kept
            keep_mask = keep_mask | ~trust_region
        stats = _stats(ratio, log_ratio, second_moment, response_mask, trust_region, keep_mask)
        token_losses = _finish(-advantages * ratio, keep_mask & response_mask, importance_weights)
        return TokenLosses(token_losses=token_losses, keep_mask=keep_mask, stats=stats)
    if log_ratio_cap is None:
        log_ratio_cap = second_moment_clip_bound(log_ratio, trust_region, tau)
    cap = log_ratio_cap.to(device=log_ratio.device, dtype=log_ratio.dtype)
    # PPO's pessimistic clip with bounds [exp(-cap), exp(cap)] binds exactly on trust-region
    # tokens with |log r| > cap: there the loss is the constant -A * exp(+-cap), as in the
    # released code, with no gradient.
    keep_mask = ~(trust_region & (log_ratio.detach().abs() > cap))
    clipped_ratio = log_ratio.detach().clamp(-cap, cap).exp()
    stats = _stats(ratio, log_ratio, second_moment, response_mask, trust_region, keep_mask, cap.square())
    stats["log_ratio_cap"] = cap.clamp(max=LOG_RATIO_LIMIT)
    token_losses = _finish(-advantages * torch.where(keep_mask, ratio, clipped_ratio), response_mask, importance_weights)
    return TokenLosses(token_losses=token_losses, keep_mask=keep_mask, stats=stats)


def _finish(token_losses, contributing, importance_weights):
    if importance_weights is not None:
        token_losses = token_losses * importance_weights
    # where, not a product: a masked token must contribute exactly 0, gradient included.
    return torch.where(contributing, token_losses, 0.0)


def no_trust_region_token_losses(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    importance_weights: torch.Tensor | None = None,
    check_finite: bool = True,
) -> TokenLosses:
    """Per-token importance-weighted policy gradient `-r * A` with no trust region at all.

    The paper's "GRPO no TR" baseline (PPO with epsilon = infinity). Same arguments and stats
    as `m2po_token_losses` (nothing is ever masked).
    """
    ratio, log_ratio, second_moment, trust_region = _prepare(
        log_probs, behaviour_log_probs, advantages, response_mask, importance_weights, check_finite
    )
    keep_mask = torch.ones_like(response_mask)
    stats = _stats(ratio, log_ratio, second_moment, response_mask, trust_region, keep_mask)
    token_losses = _finish(-advantages * ratio, response_mask, importance_weights)
    return TokenLosses(token_losses=token_losses, keep_mask=keep_mask, stats=stats)


# Who divides by what in the decoupled variant's token-mean: every valid token (the paper's footnote,
# the default) or only those the M2 mask kept (AReaL's `_get_m2po_loss_mask` + `ppo_actor_loss_fn`).
DECOUPLED_DENOMINATORS = ("valid", "kept")


def decoupled_m2po_token_losses(
    log_probs: torch.Tensor,
    proximal_log_probs: torch.Tensor,
    proximal_behaviour_log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    m2_threshold: float = PAPER_M2_THRESHOLD,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = None,
    check_finite: bool = True,
    behaviour_weight_cap: float | None = None,
    denominator: str = "valid",
    m2_keep_mask: torch.Tensor | None = None,
) -> TokenLosses:
    """AReaL's decoupled M2PO: mask on the staleness ratio, then decoupled PPO against the proximal policy.

    With `d = log pi_prox - log pi_behav` (how far the data's behaviour policy lies from a recent
    snapshot of the trainer, independent of the weights being trained), the mask of Algorithm 1 is
    computed over every valid token (not only a trust region): drop the largest `d**2` until their
    mean is `<= tau`. Each kept token then contributes the decoupled PPO loss
    `w * max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))` with `r = pi_theta / pi_prox` and the
    behaviour weight `w = exp(d)`; with `clip_ratio_c`, the dual clip bounds the loss of tokens with
    `A < 0` at `-A * c` (as verl's vanilla loss). Masked tokens contribute 0 and still count in the
    token-mean denominator.

    Two details differ from AReaL's code, by choice: the stopping rule is the paper's `mean <= tau`
    (AReaL stops at `< tau`, which differs only when a mean equals tau exactly), and when even the
    smallest `d**2` exceeds tau every token is masked (AReaL keeps one). The denominator: masked tokens
    count in it (`denominator="valid"`, the paper's footnote); AReaL removes them from its loss mask,
    i.e. divides by the tokens the M2 mask kept: `denominator="kept"` scales every token loss by
    `n_valid / n_kept` of this call (one micro-batch in verl), which gives AReaL's loss under a
    token-mean over the call's valid tokens.

    With `m2_threshold=inf` this is AReaL's decoupled PPO (`use_decoupled_loss`), and
    `behaviour_weight_cap` is its `behav_imp_weight_cap`: a token whose `w` exceeds the cap
    contributes 0 (and still counts in the denominator), as in AReaL's `ppo_actor_loss_fn`.

    Args:
        log_probs: `(batch, response_len)` log pi_theta (requires grad).
        proximal_log_probs: `(batch, response_len)` log pi_prox (verl's recomputed `old_log_prob` in
            decoupled mode).
        proximal_behaviour_log_ratio: `(batch, response_len)` `log pi_prox - log pi_behav` (in verl, the
            log of token-level, untruncated `rollout_is_weights`).
        advantages: `(batch, response_len)`.
        response_mask: `(batch, response_len)` bool.
        m2_threshold: tau (AReaL's `m2_threshold`; its M2PO recipe uses the paper's value).
        clip_ratio_low, clip_ratio_high: PPO clip range of `pi_theta / pi_prox`.
        clip_ratio_c: dual-clip bound (> 1) for `A < 0`, or None.
        check_finite: reject NaN/inf on valid tokens (one host sync).
        behaviour_weight_cap: drop tokens whose `w` exceeds it (> 0), or None for no cap.
        denominator: "valid" (the paper's) or "kept" (AReaL's), see above.
        m2_keep_mask: the M2 mask decided over a larger batch this one is part of (a whole mini-batch,
            `m2po.algorithm.minibatch_keep_masks` over `decoupled_cut_inputs`), `(batch, response_len)`
            bool; None: over this call's tokens.

    Returns:
        TokenLosses; `keep_mask` is False on masked, capped and clipped tokens (no gradient); stats as
        for the other variants with the candidates being every valid token and M2 that of `d`, plus
        `clip_fraction` (kept tokens the PPO clip removed), `behaviour_ratio_mean`/`_max` (`w`) and
        `behaviour_capped_fraction` (valid tokens the cap dropped).
    """
    tau = check_m2_threshold(m2_threshold)
    if denominator not in DECOUPLED_DENOMINATORS:
        raise ValueError(f"denominator must be one of {list(DECOUPLED_DENOMINATORS)}, got {denominator!r}")
    if behaviour_weight_cap is not None and not behaviour_weight_cap > 0:
        raise ValueError(f"behaviour_weight_cap must be > 0 or None, got {behaviour_weight_cap!r}")
    named = {
        "log_probs": log_probs,
        "proximal_log_probs": proximal_log_probs,
        "advantages": advantages,
        "proximal_behaviour_log_ratio": proximal_behaviour_log_ratio,
    }
    _check_structure(named, response_mask)
    raw_log_ratio = log_probs - proximal_log_probs
    if check_finite:
        _check_finite(raw_log_ratio, named, response_mask)
    _check_cut("m2_keep_mask", m2_keep_mask, response_mask)
    staleness_log_ratio = decoupled_cut_inputs(proximal_behaviour_log_ratio, response_mask)
    second_moment = staleness_log_ratio.square()
    if m2_keep_mask is None:
        m2_keep = second_moment_keep_mask(staleness_log_ratio, response_mask, tau)
    else:
        m2_keep = m2_keep_mask | ~response_mask

    log_ratio = torch.where(response_mask, raw_log_ratio, 0.0).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high)
    surrogate = torch.maximum(unclipped, clipped)
    without_gradient = clipped > unclipped  # the clipped term is a constant there
    if clip_ratio_c is not None:
        if not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c!r}")
        dual = -advantages * clip_ratio_c
        dual_binds = (advantages < 0) & (surrogate > dual)
        surrogate = torch.where(dual_binds, dual, surrogate)
        without_gradient = without_gradient | dual_binds

    behaviour_weight = staleness_log_ratio.exp()
    capped = torch.zeros_like(response_mask)
    if behaviour_weight_cap is not None:
        capped = response_mask & (behaviour_weight > behaviour_weight_cap)
    kept = m2_keep & ~capped  # neither masked by M2 nor dropped by the cap
    token_losses = _finish(surrogate, kept & response_mask, behaviour_weight)
    if denominator == "kept":  # AReaL: the tokens the M2 mask removed leave the denominator too
        num_valid, num_kept = response_mask.sum(), (m2_keep & response_mask).sum()
        token_losses = token_losses * (num_valid / num_kept.clamp(min=1)).to(token_losses.dtype)
    stats = _stats(ratio, log_ratio, second_moment, response_mask, response_mask, m2_keep)
    valid = response_mask.sum().to(torch.float64).clamp(min=1)
    stats["behaviour_capped_fraction"] = capped.sum().to(torch.float64) / valid
    clipped_kept = response_mask & kept & without_gradient
    stats["clip_fraction"] = clipped_kept.sum().to(torch.float64) / valid
    stats["behaviour_ratio_mean"] = torch.where(response_mask, behaviour_weight, 0.0).sum(dtype=torch.float64) / valid
    stats["behaviour_ratio_max"] = (
        torch.where(response_mask, behaviour_weight, 0.0).amax() if behaviour_weight.numel() else valid.new_zeros(())
    )
    return TokenLosses(token_losses=token_losses, keep_mask=kept & ~clipped_kept, stats=stats)


def aggregate_token_losses(
    token_losses: torch.Tensor, response_mask: torch.Tensor, loss_agg_mode: str = "token-mean"
) -> torch.Tensor:
    """Scalar loss from `(batch, response_len)` token losses, with verl's `agg_loss` semantics
    for a single local batch (no data parallelism). Never NaN: an empty mask gives 0.

    Modes: "token-mean" (paper), "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
    "seq-mean-token-sum-norm" (token sum divided by response_len).
    """
    masked = torch.where(response_mask, token_losses, 0.0)
    if loss_agg_mode == "token-mean":
        return masked.sum() / response_mask.sum().clamp(min=1)
    if loss_agg_mode == "token-sum":
        return masked.sum()
    tokens_per_sequence = response_mask.sum(dim=-1)
    num_sequences = (tokens_per_sequence > 0).sum().clamp(min=1)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = masked.sum(dim=-1).sum() / num_sequences
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / response_mask.shape[-1]
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        return (masked.sum(dim=-1) / tokens_per_sequence.clamp(min=1)).sum() / num_sequences
    raise ValueError(f"loss_agg_mode must be one of {list(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")


def m2po_loss(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    m2_threshold: float = PAPER_M2_THRESHOLD,
    variant: str = "mask",
    loss_agg_mode: str = "token-mean",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar M2PO loss and its statistics (see `m2po_token_losses`)."""
    out = m2po_token_losses(
        log_probs, behaviour_log_probs, advantages, response_mask, m2_threshold, variant, importance_weights
    )
    return aggregate_token_losses(out.token_losses, response_mask, loss_agg_mode), out.stats


def no_trust_region_loss(
    log_probs: torch.Tensor,
    behaviour_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar no-trust-region loss and its statistics (see `no_trust_region_token_losses`)."""
    out = no_trust_region_token_losses(log_probs, behaviour_log_probs, advantages, response_mask, importance_weights)
    return aggregate_token_losses(out.token_losses, response_mask, loss_agg_mode), out.stats


def decoupled_m2po_loss(
    log_probs: torch.Tensor,
    proximal_log_probs: torch.Tensor,
    proximal_behaviour_log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    m2_threshold: float = PAPER_M2_THRESHOLD,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar decoupled M2PO loss and its statistics (see `decoupled_m2po_token_losses`)."""
    out = decoupled_m2po_token_losses(
        log_probs,
        proximal_log_probs,
        proximal_behaviour_log_ratio,
        advantages,
        response_mask,
        m2_threshold,
        clip_ratio_low,
        clip_ratio_high,
        clip_ratio_c,
    )
    return aggregate_token_losses(out.token_losses, response_mask, loss_agg_mode), out.stats


def stats_to_floats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Python floats for logging, with a single device-to-host copy."""
    if not stats:
        return {}
    values = torch.stack([v.detach().double().reshape(()) for v in stats.values()]).tolist()
    return dict(zip(stats.keys(), values))
