"""verl integration: importing this module registers the `m2po` and `no_trust_region` loss modes.

It is the `verl.plugins` entry point, so `import verl` imports it in every process (the driver
and each Ray worker) as long as the package is installed there.
"""

from m2po.verl_integration.config import M2POPolicyLossConfig
from m2po.verl_integration.policy_losses import (
    METRIC_PREFIX,
    compute_policy_loss_m2po,
    compute_policy_loss_no_trust_region,
)

LOSS_MODES = ("m2po", "no_trust_region")

__all__ = [
    "LOSS_MODES",
    "METRIC_PREFIX",
    "M2POPolicyLossConfig",
    "compute_policy_loss_m2po",
    "compute_policy_loss_no_trust_region",
]
