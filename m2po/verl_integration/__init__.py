"""verl integration: importing this module registers the `m2po` and `no_trust_region` loss modes,
M2PO's start-up checks inside verl's `validate_config`, the hook that keeps a resumed run's earlier
metrics (`metrics_attempts`), the hook that decides M2PO's cut over the whole mini-batch in verl's FSDP
engine (`minibatch_scope`) and, lazily, our trainers
(`trainer.v1.trainer_mode=m2po_stale`, `m2po_separate_async`, `m2po_colocate_async`).

It is the `verl.plugins` entry point, so `import verl` imports it in every process (the driver
and each Ray worker) as long as the package is installed there. The trainers are registered by a
post-import hook on `verl.trainer.ppo.v1` (the module verl's `main_ppo` imports to look trainers
up), so processes that never use verl's v1 trainer do not pay for importing them.
"""

import wrapt

from m2po.verl_integration.config import M2POPolicyLossConfig
from m2po.verl_integration.metrics_attempts import install_metrics_attempts_hook
from m2po.verl_integration.minibatch_scope import install_minibatch_scope_hook
from m2po.verl_integration.policy_losses import (
    METRIC_PREFIX,
    compute_policy_loss_m2po,
    compute_policy_loss_no_trust_region,
)
from m2po.verl_integration.stale_settings import TRAINER_MODE
from m2po.verl_integration.startup_checks import install_entry_point_hook, install_validate_config_hook
from m2po.verl_integration.trainer_modes import LOSS_MODES


install_validate_config_hook()
install_metrics_attempts_hook()
install_entry_point_hook()
install_minibatch_scope_hook()


@wrapt.when_imported("verl.trainer.ppo.v1")
def _register_trainers(_module):
    import m2po.verl_integration.async_trainers  # noqa: F401  (m2po_separate_async, m2po_colocate_async)
    import m2po.verl_integration.stale_trainer  # noqa: F401  (m2po_stale)


__all__ = [
    "LOSS_MODES",
    "METRIC_PREFIX",
    "TRAINER_MODE",
    "M2POPolicyLossConfig",
    "compute_policy_loss_m2po",
    "compute_policy_loss_no_trust_region",
]
