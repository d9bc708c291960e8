"""The overrides that turn an experiment's config into a CPU smoke run of the same algorithm.

    python -m m2po.cpu_backend.smoke [--config-name m2po_paper] <the experiment's overrides>

prints one hydra override per line (train-scripts/launch.sh --cpu-smoke puts them before the
experiment's own overrides, so anything given on the command line still wins). Kept: loss mode and
its parameters, staleness k and warm-up mode, advantage estimator, rollout.n, ppo_epochs, and the
number of actor updates per step u (so k/u, the warm-up length, is the experiment's). Scaled down:
the model, data and lengths (`+cpu=tiny`), the batch (u x a small mini-batch of prompts), steps;
for verl's separate_async trainer, one training worker and one standalone `hf` replica synced by the
`m2po_cpu` checkpoint engine.
"""

from __future__ import annotations

import argparse
import math
import sys

SMOKE_PROMPTS = 4  # at least this many prompts per step


def smoke_overrides(config) -> list[str]:
    from m2po.cpu_backend.checkpoint_engine import BACKEND
    from m2po.verl_integration.trainer_modes import SEPARATE_ASYNC_MODES, trainer_mode

    data, actor = config.data, config.actor_rollout_ref.actor
    mini_batches_per_epoch = data.train_batch_size // actor.ppo_mini_batch_size
    mini_batch = max(1, math.ceil(SMOKE_PROMPTS / mini_batches_per_epoch))
    overrides = [
        "+cpu=tiny",
        f"data.train_batch_size={mini_batches_per_epoch * mini_batch}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini_batch}",
        f"trainer.experiment_name={config.trainer.experiment_name}-cpu-smoke",
    ]
    if trainer_mode(config) in SEPARATE_ASYNC_MODES:
        # one training worker and one standalone `hf` replica, synced through the object store
        overrides += [
            "trainer.nnodes=1",
            "trainer.n_gpus_per_node=1",
            "actor_rollout_ref.rollout.nnodes=1",
            "actor_rollout_ref.rollout.n_gpus_per_node=1",
            f"actor_rollout_ref.rollout.checkpoint_engine.backend={BACKEND}",
        ]
    return overrides


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from m2po.configs import compose

    parser = argparse.ArgumentParser(prog="python -m m2po.cpu_backend.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="m2po_paper")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    config = compose(args.config_name, args.overrides)
    try:
        OmegaConf.resolve(config.trainer)
        lines = smoke_overrides(config)
    except Exception as error:
        print(f"config error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
