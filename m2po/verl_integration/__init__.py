"""verl integration: importing this module registers the `m2po` and `no_trust_region` loss modes
and, lazily, the stale@k trainer `trainer.v1.trainer_mode=m2po_stale`.

It is the `verl.plugins` entry point, so `import verl` imports it in every process (the driver
and each Ray worker) as long as the package is installed there. The trainer is registered by a
post-import hook on `verl.trainer.ppo.v1` (the module verl's `main_ppo` imports to look trainers
up), so processes that never use verl's v1 trainer do not pay for importing it.
"""

import wrapt

from m2po import cpu_backend
from m2po.cpu_backend.config import register_resolvers as register_cpu_resolvers

from m2po.verl_integration.config import M2POPolicyLossConfig
from m2po.verl_integration.policy_losses import (
    METRIC_PREFIX,
    compute_policy_loss_m2po,
    compute_policy_loss_no_trust_region,
)
from m2po.verl_integration.stale_settings import TRAINER_MODE

LOSS_MODES = ("m2po", "no_trust_region")


# The CPU backend's resolvers are always available (registering them changes nothing); the backend
# itself is activated only when selected with VERL_PLATFORM=cpu.
register_cpu_resolvers()
if cpu_backend.is_selected():
    cpu_backend.activate()


@wrapt.when_imported("verl.trainer.ppo.v1")
def _register_stale_trainer(_module):
    import m2po.verl_integration.stale_trainer  # noqa: F401  (registers TRAINER_MODE)


__all__ = [
    "LOSS_MODES",
    "METRIC_PREFIX",
    "TRAINER_MODE",
    "M2POPolicyLossConfig",
    "compute_policy_loss_m2po",
    "compute_policy_loss_no_trust_region",
]
