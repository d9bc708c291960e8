"""The M2PO algorithm in plain PyTorch (no verl import): reusable anywhere, tested on its own."""

from m2po.algorithm.baselines import gppo_token_losses, topr_token_losses

from m2po.algorithm.losses import (
    DECOUPLED_DENOMINATORS,
    LOG_RATIO_LIMIT,
    LOSS_AGG_MODES,
    M2PO_VARIANTS,
    TokenLosses,
    aggregate_token_losses,
    check_variant,
    cut_inputs,
    decoupled_cut_inputs,
    decoupled_m2po_loss,
    decoupled_m2po_token_losses,
    m2po_loss,
    m2po_token_losses,
    no_trust_region_loss,
    no_trust_region_token_losses,
    stats_to_floats,
    validate_policy_inputs,
)
from m2po.algorithm.masking import (
    PAPER_M2_THRESHOLD,
    check_m2_threshold,
    second_moment_clip_bound,
    second_moment_keep_mask,
    trust_region_mask,
)
from m2po.algorithm.minibatch_mask import minibatch_clip_bound, minibatch_keep_masks

__all__ = [
    "DECOUPLED_DENOMINATORS",
    "LOG_RATIO_LIMIT",
    "PAPER_M2_THRESHOLD",
    "LOSS_AGG_MODES",
    "M2PO_VARIANTS",
    "TokenLosses",
    "aggregate_token_losses",
    "check_m2_threshold",
    "check_variant",
    "cut_inputs",
    "decoupled_cut_inputs",
    "decoupled_m2po_loss",
    "decoupled_m2po_token_losses",
    "gppo_token_losses",
    "minibatch_clip_bound",
    "minibatch_keep_masks",
    "m2po_loss",
    "m2po_token_losses",
    "no_trust_region_loss",
    "no_trust_region_token_losses",
    "second_moment_clip_bound",
    "second_moment_keep_mask",
    "stats_to_floats",
    "topr_token_losses",
    "trust_region_mask",
    "validate_policy_inputs",
]
