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
import os
import sys

from omegaconf import DictConfig, OmegaConf

import wrapt

from m2po.verl_integration.behaviour_ratio import check_behaviour_ratio
from m2po.verl_integration.late_names import late_name_errors
from m2po.verl_integration.minibatch_scope import scope_config_errors
from m2po.verl_integration.trainer_modes import LOSS_MODES


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
    """Raise a ValueError naming every offending key: names verl resolves only after start-up, keys
    verl would silently ignore, M2PO's mini-batch scope where it cannot work, the behaviour-ratio rules and, when the config has an `m2po.stale`
    section, the stale@k settings."""
    errors = late_name_errors(config) + ignored_key_errors(config) + scope_config_errors(config)
    if errors:
        raise ValueError("; ".join(errors))
    check_behaviour_ratio(config)
    if OmegaConf.select(config, "m2po.stale") is not None:
        from m2po.verl_integration.stale_settings import stale_settings_from_config

        stale_settings_from_config(config)


def setup_warnings(config: DictConfig) -> list[str]:
    """What would fail or be lost only once the run has started: data or a local model that is not
    there, no metrics file for `m2po report` (warned, not refused: the run may create or mount them)."""
    warnings = []
    for key in ("data.train_files", "data.val_files"):
        files = OmegaConf.select(config, key, default=None)
        files = [files] if isinstance(files, str) else list(files or [])
        missing = [str(p) for p in files if p and "://" not in str(p) and not os.path.exists(os.path.expanduser(str(p)))]
        if missing:
            warnings.append(f"{key}: {len(missing)} of {len(files)} file(s) not found from {os.getcwd()}: "
                            f"{', '.join(missing)} (bash train-scripts/generate_datasets.sh writes the paper's datasets)")
    model = OmegaConf.select(config, "actor_rollout_ref.model.path", default=None)
    if model and looks_local(str(model)) and not os.path.exists(os.path.expanduser(str(model))):
        warnings.append(f"actor_rollout_ref.model.path: {model} looks like a local path and does not exist")
    loggers = OmegaConf.select(config, "trainer.logger", default=None) or []
    loggers = [loggers] if isinstance(loggers, str) else [str(x) for x in loggers]
    if "file" not in loggers:
        warnings.append(f"trainer.logger={loggers} has no 'file': `m2po report` reads the metrics verl's file "
                        "logger writes (add trainer.logger=[console,file,...])")
    return warnings


def looks_local(path: str) -> bool:
    """A hub id is `name` or `org/name`; anything absolute, relative to the cwd or home, or deeper, is a path."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1


def install_validate_config_hook() -> None:
    """Wrap `verl.utils.config.validate_config` (idempotent). `verl.trainer.main_ppo` imports the
    function after `import verl` has loaded this plugin, so its driver calls the wrapped one."""
    import verl.utils.config as verl_config

    original = verl_config.validate_config
    if getattr(original, "_m2po_checks", False):
        return

    @functools.wraps(original)
    def validate_config(config, *args, **kwargs):
        check_m2po_config(config)  # first: verl's prints that every check passed when its own do
        result = original(config, *args, **kwargs)
        for warning in setup_warnings(config):
            print(f"warning: {warning}", file=sys.stdout, flush=True)
        return result

    validate_config._m2po_checks = True
    verl_config.validate_config = validate_config


# verl's other entry points that train on off-policy data through `run_ppo` (verl/experimental): neither
# records which weights generated a sample for our ledger, `fully_async_policy` never calls
# `validate_config`, and in their default decoupled mode the loss sees a ratio to a recomputed snapshot.
# Our losses are refused there; `trainer.v1.trainer_mode=m2po_separate_async|m2po_colocate_async` are the
# supported asynchronous trainers (docs/async.md).
UNSUPPORTED_ENTRY_POINTS = ("verl.experimental.fully_async_policy", "verl.experimental.one_step_off_policy")


def entry_point_errors(config: DictConfig, task_runner_class) -> list[str]:
    """Our losses under one of verl's experimental off-policy entry points."""
    module = getattr(task_runner_class, "__module__", "") or ""
    if module == "__main__":  # `python -m verl.experimental...`: the module's own name is in its spec
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else module
    entry = next((e for e in UNSUPPORTED_ENTRY_POINTS if module == e or module.startswith(e + ".")), None)
    loss_mode = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss.loss_mode", default=None)
    if entry is None or loss_mode not in LOSS_MODES:
        return []
    return [
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode} is not supported under {entry}: that entry point "
        "hands the loss a recomputed old_log_prob unless bypass mode is on, records no staleness, and this package "
        "has not tested it; run verl.trainer.main_ppo with trainer.v1.trainer_mode=m2po_separate_async or "
        "m2po_colocate_async instead (docs/async.md)"
    ]


def _check_run_ppo(wrapped, instance, args, kwargs):
    config = args[0] if args else kwargs.get("config")
    task_runner_class = args[1] if len(args) > 1 else kwargs.get("task_runner_class")
    errors = entry_point_errors(config, task_runner_class) if isinstance(config, DictConfig) else []
    if errors:
        raise ValueError("; ".join(errors))
    return wrapped(*args, **kwargs)


def install_entry_point_hook() -> None:
    """Wrap `verl.trainer.main_ppo.run_ppo`, which every verl entry point calls in its driver before Ray
    starts (the experimental ones import it at call time, so they get the wrapped one)."""

    @wrapt.when_imported("verl.trainer.main_ppo")
    def _wrap(module):
        if not getattr(module.run_ppo, "_m2po_entry_points", False):
            wrapt.wrap_function_wrapper(module, "run_ppo", _check_run_ppo)
            module.run_ppo._m2po_entry_points = True
