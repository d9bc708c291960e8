"""Config dataclass for the M2PO policy losses, in verl's `BaseConfig` style.

verl converts `actor_rollout_ref.actor.policy_loss` into a dataclass and rejects keys it does not
know, so M2PO's parameters live on a subclass of verl's `PolicyLossConfig`, selected in YAML with
`policy_loss._target_: m2po.verl_integration.config.M2POPolicyLossConfig` (our shipped
`configs/m2po_trainer.yaml` does this, so users need no `+` overrides).
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig

from m2po.algorithm import check_m2_threshold, check_variant

KEY_PREFIX = "actor_rollout_ref.actor.policy_loss"


@dataclass
class M2POPolicyLossConfig(PolicyLossConfig):
    """verl's `PolicyLossConfig` plus M2PO's parameters.

    Args:
        m2_threshold (float): tau, the bound on the mean squared log importance ratio over
            trust-region tokens (paper default 0.04, used in every paper run); inf disables it.
        m2po_variant (str): "mask" (paper Algorithm 1: drop the largest-(log r)^2 tokens),
            "clip" (authors' released code: PPO clip at the |log r| cap that meets tau) or
            "decoupled" (AReaL's variant for verl's asynchronous trainers in decoupled mode: the mask
            on log(pi_prox / pi_behav), then a PPO clip against pi_prox; see docs/async.md).
    """

    m2_threshold: float = 0.04
    m2po_variant: str = "mask"

    def __post_init__(self):
        check_m2_threshold(self.m2_threshold, key=f"{KEY_PREFIX}.m2_threshold")
        check_variant(self.m2po_variant, key=f"{KEY_PREFIX}.m2po_variant")
