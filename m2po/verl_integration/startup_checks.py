"""M2PO's start-up checks, run inside verl's own config validation.

verl's `main_ppo` validates the composed config in the driver before it starts Ray
(`verl.utils.config.validate_config`). The plugin wraps that public function so that M2PO's checks
run there too, whatever config the run was composed from (ours, or a user's own verl config with
`loss_mode=m2po`): a misconfigured run stops within seconds, naming the keys, instead of training
against the wrong ratio or failing after the workers have started. The same checks run in every
`--dry-run` (`m2po.dry_run`) and in our trainers' constructors.
"""

from __future__ import annotations

import functools

from omegaconf import DictConfig, OmegaConf

from m2po.verl_integration.behaviour_ratio import check_behaviour_ratio


# Keys verl 0.9.1 declares but never reads, and the key that does the job: a value set there would be
# silently ignored. verl's default of the ignored key (left alone, it says nothing).
IGNORED_KEYS = {
    # the engine workers clip with the optimizer config (workers/engine/fsdp/transformer_impl.py:795)
    "actor_rollout_ref.actor.grad_clip": ("actor_rollout_ref.actor.optim.clip_grad", 1.0),
    "critic.grad_clip": ("critic.optim.clip_grad", 1.0),
}


def ignored_key_errors(config: DictConfig) -> list[str]:
    """A key set away from verl's default where verl reads another key with another value."""
    errors = []
    for key, (used, default) in IGNORED_KEYS.items():
        value, effective = OmegaConf.select(config, key), OmegaConf.select(config, used)
        if value is None or value == default or value == effective:
            continue
        errors.append(
            f"{key}={value} is not read by verl 0.9.1's trainer, which clips at {used}={effective}: "
            f"set {used}={value} instead"
        )
    return errors


def check_m2po_config(config: DictConfig) -> None:
    """Raise a ValueError naming every offending key: the behaviour-ratio rules, keys verl would
    silently ignore and, when the config has an `m2po.stale` section, the stale@k settings."""
    errors = ignored_key_errors(config)
    if errors:
        raise ValueError("; ".join(errors))
    check_behaviour_ratio(config)
    if OmegaConf.select(config, "m2po.stale") is not None:
        from m2po.verl_integration.stale_settings import stale_settings_from_config

        stale_settings_from_config(config)


def install_validate_config_hook() -> None:
    """Wrap `verl.utils.config.validate_config` (idempotent). `verl.trainer.main_ppo` imports the
    function after `import verl` has loaded this plugin, so its driver calls the wrapped one."""
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, "_m2po_checks", False):
        return

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        result = original(config, *args, **kwargs)
        check_m2po_config(config)
        return result

    validate_config._m2po_checks = True
    verl_config.validate_config = validate_config
