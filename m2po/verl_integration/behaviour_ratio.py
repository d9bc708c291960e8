"""Which importance ratio reaches the policy loss, and refusing the configurations where it is wrong.

In verl 0.9.1's asynchronous v1 trainers (`separate_async`, `colocate_async`) a rollout can be many
weight versions old, and `_compute_old_log_prob` fills `old_log_prob` in one of two ways:
- bypass mode (`algorithm.rollout_correction.bypass_mode=true`): the rollout engine's log-probs recorded
  at generation time (`rollout.calculate_log_probs=true`), so the loss sees `pi_theta / pi_behav`;
- decoupled mode (the default): a recompute with the trainer's recent weights (`pi_prox`, a snapshot
  taken at the start of each sync window), so the loss sees `pi_theta / pi_prox`, which is 1 on the
  first update of every window. The gap to the policy that generated the data reaches the loss only
  through `rollout_is_weights = pi_prox / pi_behav`, when `rollout_correction.rollout_is` is set.

The stale@k trainer (`m2po_stale`) is in bypass mode by construction (old_log_prob = the behaviour
log-probs recorded at generation), unless `m2po.stale.recompute_proximal=true`: then old_log_prob is
recomputed by the current actor when the stale batch is trained, the behaviour log-probs become
`rollout_log_probs`, and the loss is in decoupled mode as above (AReaL's decoupled PPO at stale@k).

M2PO as in the paper (`m2po_variant` mask or clip) bounds the second moment of `log(pi_theta / pi_behav)`
and needs bypass mode. The AReaL-style `decoupled` variant bounds that of `log(pi_prox / pi_behav)`, read
from token-level, untruncated `rollout_is_weights`, and clips against `pi_prox`. A configuration in which
neither ratio reaches the loss trains as if the data were fresh, silently; `behaviour_ratio_errors`
lists every such key (plain OmegaConf, no verl import), and the start-up hook, the launcher's dry run and
our trainers refuse them.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from m2po.verl_integration.trainer_modes import (
    ASYNC_MODES,
    OUR_TRAINER_MODES,
    STALE_TRAINER_MODE,
    decoupled_loss_setting,
    trainer_mode,
)
from m2po.utils.config_values import config_value

LOSS_KEY = "actor_rollout_ref.actor.policy_loss"
CORRECTION_KEY = "algorithm.rollout_correction"
CALCULATE_LOG_PROBS_KEY = "actor_rollout_ref.rollout.calculate_log_probs"
RECOMPUTE_PROXIMAL_KEY = "m2po.stale.recompute_proximal"
# verl clamps log(pi_prox / pi_behav) to +-20 before exponentiating (rollout_corr_helper.SAFETY_BOUND),
# so an upper TIS threshold at or above exp(20) never truncates and log(weight) is the exact log-ratio.
UNTRUNCATED_IS_THRESHOLD = 5e8
assert UNTRUNCATED_IS_THRESHOLD > math.exp(20)

BYPASS_FIX = (
    f"set {CORRECTION_KEY}.bypass_mode=true and {CALCULATE_LOG_PROBS_KEY}=true (old_log_prob = the rollout "
    "engine's log-probs at generation time)"
)
DECOUPLED_FIX = (
    f"{LOSS_KEY}.m2po_variant=decoupled (or loss_mode=decoupled_ppo) with {CORRECTION_KEY}.rollout_is=token, "
    f"{CORRECTION_KEY}.rollout_is_threshold={UNTRUNCATED_IS_THRESHOLD:g} and bypass_mode=false (AReaL's variant)"
)



def parse_is_threshold(spec) -> tuple[float, float | None]:
    """`(upper, lower)` of `rollout_is_threshold` read as verl 0.9.1 reads it
    (`trainer/ppo/rollout_corr_helper.py::_parse_rollout_is_threshold`): a string with an underscore is
    an IcePop band `lower_upper` (weights outside it are zeroed), even where Python's `float()` would
    read it as one number (`'1_1000000000'`)."""
    if isinstance(spec, bool):
        raise TypeError(f"rollout_is_threshold must be a number or 'lower_upper', got {spec!r}")
    if isinstance(spec, (int, float)):
        return float(spec), None
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"rollout_is_threshold must be a number or 'lower_upper', got {spec!r}")
    spec = spec.strip()
    if "_" in spec:
        lower, upper = spec.split("_", 1)
        return float(upper), float(lower)
    return float(spec), None


def _untruncated_token_weights_errors(config: DictConfig, why: str) -> list[str]:
    """What keeps `rollout_is_weights` from being exactly `pi_prox / pi_behav` per token."""
    errors = []
    rollout_is = config_value(config, f"{CORRECTION_KEY}.rollout_is")
    if rollout_is != "token":
        errors.append(f"{CORRECTION_KEY}.rollout_is={rollout_is!r}: {why} needs per-token weights, set it to 'token'")
    threshold = config_value(config, f"{CORRECTION_KEY}.rollout_is_threshold", 2.0)
    try:
        upper, lower = parse_is_threshold(threshold)
    except (TypeError, ValueError):
        upper, lower = None, None
    if upper is None or lower is not None or upper < UNTRUNCATED_IS_THRESHOLD:
        errors.append(
            f"{CORRECTION_KEY}.rollout_is_threshold={threshold!r}: {why} reads log(pi_prox / pi_behav) from the weights, "
            f"which must not be truncated or zeroed; set it to {UNTRUNCATED_IS_THRESHOLD:g}"
        )
    if config_value(config, f"{CORRECTION_KEY}.rollout_is_batch_normalize", False):
        errors.append(f"{CORRECTION_KEY}.rollout_is_batch_normalize=true rescales the weights; {why} needs false")
    return errors


def behaviour_ratio_errors(config: DictConfig) -> list[str]:
    """Every key that keeps the configured loss from seeing the ratio to the behaviour policy."""
    mode = trainer_mode(config)
    loss_mode = config_value(config, f"{LOSS_KEY}.loss_mode", "vanilla")
    variant = config_value(config, f"{LOSS_KEY}.m2po_variant", "mask")
    bypass = bool(config_value(config, f"{CORRECTION_KEY}.bypass_mode", False))
    calculate_log_probs = bool(config_value(config, CALCULATE_LOG_PROBS_KEY, True))
    is_async = mode in ASYNC_MODES
    recompute_proximal = mode == STALE_TRAINER_MODE and bool(config_value(config, RECOMPUTE_PROXIMAL_KEY, False))
    decoupled_loss = decoupled_loss_setting(loss_mode, variant)
    errors = []

    if decoupled_loss:
        if not (is_async or recompute_proximal):
            return [
                f"{LOSS_KEY}.{decoupled_loss} needs a proximal policy: an asynchronous trainer (trainer.v1.trainer_mode "
                f"in {list(ASYNC_MODES)}) or trainer_mode={STALE_TRAINER_MODE} with {RECOMPUTE_PROXIMAL_KEY}=true, got "
                f"{mode!r}: otherwise old_log_prob is the behaviour policy's own and there is nothing to decouple"
                + ("; use m2po_variant=mask" if loss_mode == "m2po" else "")
            ]
        if bypass:
            errors.append(
                f"{CORRECTION_KEY}.bypass_mode=true makes old_log_prob the behaviour log-prob: {decoupled_loss} "
                "needs the recomputed proximal one (bypass_mode=false)"
                + ("; for the paper's ratio use m2po_variant=mask" if loss_mode == "m2po" else "")
            )
        errors += _untruncated_token_weights_errors(config, decoupled_loss)
        if is_async and not calculate_log_probs:
            errors.append(f"{CALCULATE_LOG_PROBS_KEY}=false: {decoupled_loss} needs the rollout's log-probs")
        return errors

    if bypass and not calculate_log_probs:
        return [f"{CORRECTION_KEY}.bypass_mode=true needs {CALCULATE_LOG_PROBS_KEY}=true (the log-probs it trains against)"]
    if recompute_proximal:
        # m2po_stale recomputing old_log_prob with the current actor when a batch is trained.
        snapshot = (
            f"with {RECOMPUTE_PROXIMAL_KEY}=true, old_log_prob is recomputed by the current actor when a stale batch "
            "is trained, so the loss ratio is pi_theta / pi_prox (1 on the step's first update), not pi_theta / "
            "pi_behav of the policy that generated the data"
        )
        paper_ratio_fix = f"set {RECOMPUTE_PROXIMAL_KEY}=false (old_log_prob = the behaviour log-probs)"
    elif is_async and not bypass:
        # An asynchronous trainer in decoupled mode: old_log_prob is the trainer's snapshot.
        snapshot = (
            f"with trainer.v1.trainer_mode={mode} and {CORRECTION_KEY}.bypass_mode=false, verl recomputes old_log_prob "
            "with the trainer's weights at the start of each sync window, so the loss ratio is pi_theta / pi_snapshot "
            "(1 on the first update of every window), not pi_theta / pi_behav of the policy that generated the data"
        )
        paper_ratio_fix = BYPASS_FIX
    else:
        return []

    if loss_mode == "m2po":
        errors.append(
            f"{LOSS_KEY}.loss_mode=m2po (m2po_variant={variant}): {snapshot}, and M2PO's mask would bound the wrong "
            f"second moment; {paper_ratio_fix} for the paper's ratio, or use {DECOUPLED_FIX}"
        )
    elif loss_mode == "no_trust_region":
        weight_errors = _untruncated_token_weights_errors(config, "no_trust_region in decoupled mode")
        if weight_errors:  # with exact token weights, -w * (pi_theta/pi_prox) * A is -(pi_theta/pi_behav) * A
            errors.append(f"{LOSS_KEY}.loss_mode=no_trust_region: {snapshot}; {paper_ratio_fix}")
    elif config_value(config, f"{CORRECTION_KEY}.rollout_is") is None:
        errors.append(
            f"{LOSS_KEY}.loss_mode={loss_mode}: {snapshot}, and {CORRECTION_KEY}.rollout_is=null drops that gap "
            f"entirely (the clip acts against pi_prox); {paper_ratio_fix} (the loss against the behaviour policy), "
            f"or set {CORRECTION_KEY}.rollout_is=token|sequence (decoupled PPO with importance weights)"
        )
    return errors


ROLLOUT_KEY = "actor_rollout_ref.rollout"
M2PO_FAMILY = ("m2po", "no_trust_region", "decoupled_ppo")  # losses whose mask or weights read log(pi / pi_behav)


def rollout_log_probs_in_loss(config: DictConfig) -> str | None:
    """Why the loss reads the rollout engine's log-probs (as old_log_prob or inside the importance
    weights), or None where the trainer recomputes the behaviour log-probs itself."""
    mode = trainer_mode(config)
    if config_value(config, f"{CORRECTION_KEY}.bypass_mode", False):
        return f"{CORRECTION_KEY}.bypass_mode=true (old_log_prob = the rollout's log-probs)"
    if mode == STALE_TRAINER_MODE and config_value(config, "m2po.stale.behaviour_log_probs", "actor") == "rollout":
        return "m2po.stale.behaviour_log_probs=rollout (old_log_prob = the rollout's log-probs)"
    if config_value(config, f"{CORRECTION_KEY}.rollout_is") is not None:
        return f"{CORRECTION_KEY}.rollout_is (the weights divide by the rollout's probabilities)"
    loss_mode = config_value(config, f"{LOSS_KEY}.loss_mode", "vanilla")
    decoupled = decoupled_loss_setting(loss_mode, config_value(config, f"{LOSS_KEY}.m2po_variant", "mask"))
    return f"{LOSS_KEY}.{decoupled} (its weights divide by the rollout's probabilities)" if decoupled else None


def rollout_log_prob_errors(config: DictConfig) -> list[str]:
    """Rollout settings under which the engine's log-probs are not those of the distribution verl's
    actor recomputes (the full softmax at the rollout temperature), where the loss reads them: M2 would
    carry an offset that has nothing to do with staleness, and the mask would act on it."""
    ours = (config_value(config, f"{LOSS_KEY}.loss_mode", "vanilla") in M2PO_FAMILY
            or trainer_mode(config) in OUR_TRAINER_MODES)
    why = rollout_log_probs_in_loss(config) if ours else None  # verl's own losses and trainers: verl's call
    if why is None or not config_value(config, CALCULATE_LOG_PROBS_KEY, True):
        return []
    top_p = config_value(config, f"{ROLLOUT_KEY}.top_p", 1.0)
    top_k = config_value(config, f"{ROLLOUT_KEY}.top_k", -1)
    temperature = config_value(config, f"{ROLLOUT_KEY}.temperature", 1.0)
    logprobs_mode = config_value(config, f"{ROLLOUT_KEY}.logprobs_mode", "processed_logprobs")
    errors = []
    if top_p is not None and float(top_p) < 1:
        errors.append(f"{ROLLOUT_KEY}.top_p={top_p}: the rollout's log-probs are then those of the truncated, "
                      "renormalised distribution, not the full softmax the actor recomputes; set it to 1")
    if top_k is not None and int(top_k) > 0:
        errors.append(f"{ROLLOUT_KEY}.top_k={top_k}: the rollout's log-probs are then those of the truncated, "
                      "renormalised distribution, not the full softmax the actor recomputes; set it to -1")
    if logprobs_mode is not None and str(logprobs_mode).endswith("logits"):
        errors.append(f"{ROLLOUT_KEY}.logprobs_mode={logprobs_mode}: logits are not log-probs; set processed_logprobs")
    elif logprobs_mode == "raw_logprobs" and temperature is not None and float(temperature) != 1:
        errors.append(f"{ROLLOUT_KEY}.logprobs_mode=raw_logprobs ignores {ROLLOUT_KEY}.temperature={temperature}, "
                      "which the actor applies when it recomputes; set processed_logprobs")
    return [f"{error} ({why})" for error in errors]


def rejection_sampling_errors(config: DictConfig) -> list[str]:
    """verl's rollout rejection sampling with an M2PO-family loss: ignored in bypass mode, and otherwise
    it drops tokens from the set whose second moment the mask bounds."""
    rs = config_value(config, f"{CORRECTION_KEY}.rollout_rs")
    loss_mode = config_value(config, f"{LOSS_KEY}.loss_mode", "vanilla")
    if rs is None or loss_mode not in M2PO_FAMILY:
        return []
    if config_value(config, f"{CORRECTION_KEY}.bypass_mode", False):
        effect = "verl ignores it in bypass mode, so the run would not do what it says"
    else:
        effect = "it removes tokens from the response mask, i.e. from the set whose M2 the mask bounds"
    return [f"{CORRECTION_KEY}.rollout_rs={rs!r} with {LOSS_KEY}.loss_mode={loss_mode}: {effect}; M2PO's mask is "
            "its own rejection rule, set rollout_rs=null"]


def check_behaviour_ratio(config: DictConfig) -> None:
    """Raise a ValueError naming every offending key (see `behaviour_ratio_errors`,
    `rollout_log_prob_errors`, `rejection_sampling_errors`)."""
    errors = behaviour_ratio_errors(config)
    if errors:
        raise ValueError("the policy loss would not see the ratio to the behaviour policy: " + "; ".join(errors))
    log_prob_errors = rollout_log_prob_errors(config)
    errors = (["the behaviour log-probs would not be what the trainer recomputes: " + "; ".join(log_prob_errors)]
              if log_prob_errors else []) + rejection_sampling_errors(config)
    if errors:
        raise ValueError("; ".join(errors))


def proximal_behaviour_log_ratio(rollout_is_weights: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """`log(pi_prox / pi_behav)` per token from verl's token-level, untruncated `rollout_is_weights`
    `(batch, response_len)`; 0 on padding (where verl's weights may be anything)."""
    return torch.where(response_mask, rollout_is_weights, 1.0).log()
