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

from omegaconf import DictConfig

from m2po.verl_integration.trainer_modes import ASYNC_MODES, STALE_TRAINER_MODE, decoupled_loss_setting, trainer_mode
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



def _untruncated_token_weights_errors(config: DictConfig, why: str) -> list[str]:
    """What keeps `rollout_is_weights` from being exactly `pi_prox / pi_behav` per token."""
    errors = []
    rollout_is = config_value(config, f"{CORRECTION_KEY}.rollout_is")
    if rollout_is != "token":
        errors.append(f"{CORRECTION_KEY}.rollout_is={rollout_is!r}: {why} needs per-token weights, set it to 'token'")
    threshold = config_value(config, f"{CORRECTION_KEY}.rollout_is_threshold", 2.0)
    try:
        upper = float(threshold)
    except (TypeError, ValueError):  # "lower_upper" is IcePop: it zeroes weights outside the band
        upper = None
    if upper is None or upper < UNTRUNCATED_IS_THRESHOLD:
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


def check_behaviour_ratio(config: DictConfig) -> None:
    """Raise a ValueError naming every offending key (see `behaviour_ratio_errors`)."""
    errors = behaviour_ratio_errors(config)
    if errors:
        raise ValueError("the policy loss would not see the ratio to the behaviour policy: " + "; ".join(errors))
