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
    config = compose(args.config_name, args.overrides)
    try:
        resolved = validate_experiment(config)
    except Exception as error:  # report like a start-up failure, without a traceback
        print(f"config error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    print(f"# dry run OK: {summary(resolved)}", file=sys.stderr)
    return 0


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
        f"staleness={resolved['m2po']['stale']['staleness_updates']} updates, trainer_mode={mode}, {layout})"
    )


if __name__ == "__main__":
    sys.exit(main())
