"""Config dataclass for the M2PO policy losses, in verl's `BaseConfig` style.

verl converts `actor_rollout_ref.actor.policy_loss` into a dataclass and rejects keys it does not
know, so M2PO's parameters live on a subclass of verl's `PolicyLossConfig`, selected in YAML with
`policy_loss._target_: m2po.verl_integration.config.M2POPolicyLossConfig` (our shipped
`configs/m2po_trainer.yaml` does this, so users need no `+` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from verl.workers.config import FSDPActorConfig, PolicyLossConfig

from m2po.algorithm import DECOUPLED_DENOMINATORS, PAPER_M2_THRESHOLD, check_m2_threshold, check_variant
from m2po.verl_integration.minibatch_scope import DEFAULT_SCOPE, SCOPES
from m2po.verl_integration.trainer_modes import decoupled_loss_setting

KEY_PREFIX = "actor_rollout_ref.actor.policy_loss"


@dataclass
class M2POPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus M2PO's parameters.

    Args:
        m2_threshold (float): tau, the bound on the mean squared log importance ratio over
            trust-region tokens (paper default `PAPER_M2_THRESHOLD`, used in every paper run); inf disables it.
        m2po_variant (str): "mask" (paper Algorithm 1: drop the largest-(log r)^2 tokens),
            "clip" (authors' released code: PPO clip at the |log r| cap that meets tau) or
            "decoupled" (AReaL's variant for verl's asynchronous trainers in decoupled mode, or
            m2po_stale with m2po.stale.recompute_proximal: the mask on log(pi_prox / pi_behav), then
            a PPO clip against pi_prox; see docs/async.md).
        behaviour_weight_cap (float, optional): for the decoupled losses (`loss_mode=decoupled_ppo`,
            `m2po_variant=decoupled`): drop tokens whose pi_prox / pi_behav exceeds it (AReaL's
            `behav_imp_weight_cap`, now its `rejection_sampling` setting); None = no cap.
        decoupled_denominator (str): for the decoupled losses, what the token-mean divides by: "valid"
            (every valid token, the paper's footnote; default) or "kept" (the tokens the M2 mask kept,
            AReaL's code: the loss scaled by n_valid / n_kept per micro-batch); docs/async.md.
        m2_scope (str): which tokens Algorithm 1's cut (or the clip variant's cap) is taken over in verl's
            actor: "mini_batch" (the paper's: every token of the optimizer mini-batch on all data-parallel
            ranks, decided by an extra forward without gradient, the same whatever the micro-batching and
            the number of GPUs; FSDP strategies only) or "micro_batch" (each micro-batch on each rank, as
            the authors' fork and AReaL do; no extra forward). docs/losses.md, "Which batch".
    """

    m2_threshold: float = PAPER_M2_THRESHOLD
    m2po_variant: str = "mask"
    behaviour_weight_cap: Optional[float] = None
    decoupled_denominator: str = "valid"
    m2_scope: str = DEFAULT_SCOPE

    def __post_init__(self):
        check_m2_threshold(self.m2_threshold, key=f"{KEY_PREFIX}.m2_threshold")
        check_variant(self.m2po_variant, key=f"{KEY_PREFIX}.m2po_variant")
        cap = self.behaviour_weight_cap
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 1):
            raise ValueError(f"{KEY_PREFIX}.behaviour_weight_cap must be a number > 1 or null (no cap), got {cap!r}")
        if self.decoupled_denominator not in DECOUPLED_DENOMINATORS:
            raise ValueError(
                f"{KEY_PREFIX}.decoupled_denominator must be one of {list(DECOUPLED_DENOMINATORS)}, "
                f"got {self.decoupled_denominator!r}"
            )
        if self.m2_scope not in SCOPES:
            raise ValueError(f"{KEY_PREFIX}.m2_scope must be one of {list(SCOPES)}, got {self.m2_scope!r}")
        if (self.m2_scope, self.decoupled_denominator, self.loss_mode, self.m2po_variant) == ("mini_batch", "kept", "m2po", "decoupled"):
            raise ValueError(
                f"{KEY_PREFIX}.decoupled_denominator='kept' is AReaL's rescaling of each micro-batch by its own "
                f"n_valid / n_kept, which needs the mask taken per micro-batch: set {KEY_PREFIX}.m2_scope=micro_batch "
                "with it (or decoupled_denominator=valid)"
            )
        if self.decoupled_denominator != "valid" and decoupled_loss_setting(self.loss_mode, self.m2po_variant) is None:
            raise ValueError(
                f"{KEY_PREFIX}.decoupled_denominator={self.decoupled_denominator!r} has no effect with loss_mode="
                f"{self.loss_mode!r} (m2po_variant={self.m2po_variant!r}): only the decoupled losses have it"
            )
        if cap is not None and decoupled_loss_setting(self.loss_mode, self.m2po_variant) is None:
            raise ValueError(
                f"{KEY_PREFIX}.behaviour_weight_cap={cap} has no effect with loss_mode={self.loss_mode!r} "
                f"(m2po_variant={self.m2po_variant!r}): only loss_mode=decoupled_ppo and m2po_variant=decoupled "
                "weigh tokens by pi_prox / pi_behav; set it to null"
            )


def actor_config(
    loss_mode: str = "m2po",
    *,
    clip_ratio: float = 0.2,
    loss_agg_mode: str = "token-mean",
    rollout_n: int = 1,
    mini_batch_size: int = 1,
    **policy_loss,
) -> FSDPActorConfig:
    """verl's actor config for calling the registered policy losses outside verl's workers (the CPU
    testbed, the loss benchmark, tests): `loss_mode` with M2PO's `policy_loss` parameters
    (`m2_threshold`, `m2po_variant`), PPO's symmetric clip range `clip_ratio` (dual clip at
    max(3, clip_ratio), verl's default bound), one mini-batch of `mini_batch_size` sequences."""
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=rollout_n,
        ppo_mini_batch_size=mini_batch_size,
        ppo_micro_batch_size_per_gpu=mini_batch_size,
        clip_ratio=clip_ratio,
        clip_ratio_low=clip_ratio,
        clip_ratio_high=clip_ratio,
        clip_ratio_c=max(3.0, clip_ratio),
        loss_agg_mode=loss_agg_mode,
        use_torch_compile=False,
        policy_loss=M2POPolicyLossConfig(loss_mode=loss_mode, **policy_loss),
    )
