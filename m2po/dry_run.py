"""The scripts' `--dry-run`: compose an experiment's complete verl config and validate it, running nothing.

    python -m m2po.dry_run --config-name m2po_paper llm=qwen2.5-math-7b method=m2po \
        m2po.stale.staleness_updates=256 [any verl override]

Runs every check verl's `main_ppo` runs before it starts Ray (`validate_config`, the actor
config's dataclass conversion, which validates M2PO's keys) plus ours (`m2po.stale`, and which
importance ratio reaches the loss), resolves every interpolation, and prints the resolved config as
YAML. Needs no GPU, model or data.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys

from omegaconf import DictConfig, OmegaConf

from m2po.configs import compose


def validate_experiment(config: DictConfig) -> dict:
    """Raise on any config error verl or m2po would raise at start-up; return the resolved config."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    from m2po.verl_integration.startup_checks import check_m2po_config

    experiment = config.get("m2po", {}).get("experiment", {})
    for key in ("llm", "method"):
        if key in experiment and OmegaConf.is_missing(experiment, key):
            raise ValueError(f"m2po.experiment.{key} is not set: choose {key}=<name> (see configs/{key}/)")
    resolved = OmegaConf.to_container(config, resolve=True)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    check_m2po_config(config)  # also inside validate_config when the plugin is loaded; explicit here
    return resolved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2po.dry_run", description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="m2po_paper")
    parser.add_argument("--quiet", action="store_true", help="validate only, do not print the config")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for verl's main_ppo")
    args = parser.parse_args(argv)
    verl_output = io.StringIO()
    try:
        config = compose(args.config_name, args.overrides)
        with contextlib.redirect_stdout(verl_output):  # verl prints that its checks passed before ours ran
            resolved = validate_experiment(config)
    except Exception as error:  # report like a start-up failure, without a traceback
        print(f"config error: {error_message(error, args.config_name, args.overrides)}", file=sys.stderr)
        return 2
    sys.stderr.write(verl_output.getvalue())  # with our warnings (startup_checks.setup_warnings)
    if not args.quiet:
        print(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    print(f"# dry run OK: {summary(resolved)}", file=sys.stderr)
    return 0


def error_message(error: Exception, config_name: str, overrides: list[str]) -> str:
    """One line for a config error: an override of a key that does not exist names the nearest one."""
    from hydra.errors import ConfigCompositionException

    text = str(error).strip()
    if isinstance(error, ConfigCompositionException):
        match = re.match(r"Could not override '([^']+)'", text)
        message = unknown_key_message(match.group(1), config_name, overrides) if match else None
        return message or " ".join(text.split("Config search path")[0].split())
    return f"{type(error).__name__}: {' '.join(text.split())}"


def unknown_key_message(key: str, config_name: str, overrides: list[str]) -> str | None:
    """The key's first part that the composed config lacks, and the nearest key there; None when the
    key exists (hydra could not override it for another reason, which its own message says)."""
    from m2po.verl_integration.late_names import nearest

    others = [o for o in overrides if o.lstrip("~+").split("=", 1)[0] != key]
    try:
        node = compose(config_name, others)
    except Exception:  # another override is wrong too: no suggestion then
        node = None
    if node is None:
        return f"{key} is not a key of the composed config; to add a new key, write +{key}=<value>"
    parts, hint = key.split("."), ""
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            break
        if part not in node:
            close = nearest(part, [str(k) for k in node.keys()])
            if close:
                hint = f" (did you mean '{'.'.join([*parts[:depth], close, *parts[depth + 1:]])}'?)"
            break
        node = node[part]
    else:
        return None
    return f"{key} is not a key of the composed config{hint}; to add a new key, write +{key}=<value>"


def summary(resolved: dict) -> str:
    """One line: run name, loss, staleness, trainer mode, GPU layout."""
    from m2po.verl_integration.trainer_modes import SEPARATE_ASYNC_MODES, trainer_mode

    trainer, rollout = resolved["trainer"], resolved["actor_rollout_ref"]["rollout"]
    mode = trainer_mode(OmegaConf.create(resolved))
    layout = f"{trainer['nnodes']}x{trainer['n_gpus_per_node']} GPUs"
    if mode in SEPARATE_ASYNC_MODES:
        layout += f" train + {rollout['nnodes']}x{rollout['n_gpus_per_node']} GPUs rollout"
    return (
        f"{trainer['experiment_name']} (loss_mode={resolved['actor_rollout_ref']['actor']['policy_loss']['loss_mode']}, "
        f"{staleness_summary(resolved, mode)}, trainer_mode={mode}, {layout})"
    )


def staleness_summary(resolved: dict, mode: str) -> str:
    """stale@k: exactly k updates; verl's asynchronous modes: the bound their sampler enforces."""
    from m2po.verl_integration.trainer_modes import ASYNC_MODES

    if mode not in ASYNC_MODES:
        return f"staleness={resolved['m2po']['stale']['staleness_updates']} updates"
    v1 = resolved["trainer"]["v1"]
    verl_mode = mode.removeprefix("m2po_")  # our modes read the settings of the verl mode they extend
    sync_step = (v1.get(verl_mode) or {}).get("parameter_sync_step", 1)
    versions = (v1.get("sampler") or {}).get("max_off_policy_threshold")
    if versions is None:
        return "staleness unbounded (trainer.v1.sampler.max_off_policy_threshold=null)"
    return (f"staleness up to about {versions * sync_step} updates (trainer.v1.sampler.max_off_policy_threshold="
            f"{versions} versions x trainer.v1.{verl_mode}.parameter_sync_step={sync_step})")


if __name__ == "__main__":
    sys.exit(main())
