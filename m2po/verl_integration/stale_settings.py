"""The `m2po.stale` config section: stale@k settings for verl's trainer, validated at start-up.

Reads a composed verl config (omegaconf only, no verl import) so that the launcher's dry run
and the trainer check exactly the same things, and every error names the key to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from m2po.buffer import StalenessConfig
from m2po.verl_integration.trainer_modes import STALE_TRAINER_MODE as TRAINER_MODE
BEHAVIOUR_LOG_PROBS = ("actor", "rollout")
SECTION = "m2po.stale"


@dataclass(frozen=True)
class StaleTrainerSettings:
    """What the stale@k trainer needs from the config.

    staleness: k and the warm-up, with u = updates per iteration derived from the actor's
        mini-batch structure.
    behaviour_log_probs: "actor" (recomputed by the training engine when the batch is
        generated, as the authors do) or "rollout" (the rollout engine's own log-probs).
    ram_budget_bytes: compact bytes of queued batches kept in RAM (None = no limit); the
        newest beyond it spill to `spill_dir`.
    """

    staleness: StalenessConfig
    behaviour_log_probs: str
    ram_budget_bytes: int | None
    spill_dir: str
    checkpoint_dir: str

    @property
    def enabled(self) -> bool:
        return self.staleness.staleness_updates > 0



def updates_per_iteration(config: DictConfig) -> int:
    """u: optimizer updates of the actor per training step (mini-batches per batch x PPO epochs)."""
    train_batch_size = config_value(config, "data.train_batch_size")
    mini_batch_size = config_value(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    ppo_epochs = config_value(config, "actor_rollout_ref.actor.ppo_epochs", 1)
    if not isinstance(train_batch_size, int) or train_batch_size < 1:
        raise ValueError(f"data.train_batch_size must be a positive integer, got {train_batch_size!r}")
    if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size must be a positive integer, got {mini_batch_size!r}"
        )
    if train_batch_size % mini_batch_size:
        raise ValueError(
            f"stale@k counts model updates, so data.train_batch_size ({train_batch_size}) must be a multiple of "
            f"actor_rollout_ref.actor.ppo_mini_batch_size ({mini_batch_size})"
        )
    return train_batch_size // mini_batch_size * int(ppo_epochs)


def stale_settings_from_config(config: DictConfig) -> StaleTrainerSettings:
    """Validate `m2po.stale` against the rest of the config.

    Raises:
        ValueError: naming the offending key and the allowed values.
    """
    staleness_updates = config_value(config, f"{SECTION}.staleness_updates", 0)
    warmup = config_value(config, f"{SECTION}.warmup", "base_policy")
    behaviour = config_value(config, f"{SECTION}.behaviour_log_probs", "actor")
    ram_budget_gb = config_value(config, f"{SECTION}.ram_budget_gb", None)
    checkpoint_dir = str(config_value(config, "trainer.default_local_dir", "checkpoints"))
    spill_dir = config_value(config, f"{SECTION}.spill_dir", None) or os.path.join(checkpoint_dir, "m2po_stale_spill")

    staleness = StalenessConfig(
        staleness_updates=staleness_updates,
        updates_per_iteration=updates_per_iteration(config),
        warmup=warmup,
        key_prefix=SECTION,
    )
    if behaviour not in BEHAVIOUR_LOG_PROBS:
        raise ValueError(f"{SECTION}.behaviour_log_probs must be one of {list(BEHAVIOUR_LOG_PROBS)}, got {behaviour!r}")
    if ram_budget_gb is not None and (isinstance(ram_budget_gb, bool) or not float(ram_budget_gb) > 0):
        raise ValueError(f"{SECTION}.ram_budget_gb must be > 0 or null (no limit), got {ram_budget_gb!r}")
    settings = StaleTrainerSettings(
        staleness=staleness,
        behaviour_log_probs=behaviour,
        ram_budget_bytes=None if ram_budget_gb is None else int(float(ram_budget_gb) * 2**30),
        spill_dir=str(spill_dir),
        checkpoint_dir=checkpoint_dir,
    )
    _check_trainer(config, settings)
    return settings


def _check_trainer(config: DictConfig, settings: StaleTrainerSettings) -> None:
    trainer_mode = config_value(config, "trainer.v1.trainer_mode", "sync")
    use_v1 = config_value(config, "trainer.use_v1", True)
    k = settings.staleness.staleness_updates
    if settings.enabled and (not use_v1 or trainer_mode != TRAINER_MODE):
        raise ValueError(
            f"{SECTION}.staleness_updates={k} needs verl's v1 trainer in our mode: set trainer.use_v1=true and "
            f"trainer.v1.trainer_mode={TRAINER_MODE} (got use_v1={use_v1}, trainer_mode={trainer_mode}); "
            f"configs/m2po_trainer.yaml sets both"
        )
    if not settings.enabled:  # staleness 0: verl's sync trainer, nothing else to check
        return
    if config_value(config, "trainer.critic_warmup", 0):
        raise ValueError(
            f"trainer.critic_warmup must be 0 with trainer.v1.trainer_mode={TRAINER_MODE}: staleness is counted in "
            f"actor updates from the first step"
        )
    if config_value(config, "algorithm.filter_groups.enable", False):
        raise ValueError(
            f"algorithm.filter_groups.enable=true (DAPO group filtering) is not supported with "
            f"trainer.v1.trainer_mode={TRAINER_MODE}: it changes how many prompts a step trains on"
        )
    if config_value(config, "algorithm.rollout_correction.bypass_mode", False):
        raise ValueError(
            f"algorithm.rollout_correction.bypass_mode=true is not supported with trainer.v1.trainer_mode="
            f"{TRAINER_MODE} (it swaps the loss for verl's bypass loss); to train against the rollout engine's "
            f"log-probs set {SECTION}.behaviour_log_probs=rollout"
        )
    if settings.behaviour_log_probs == "rollout" and not config_value(
        config, "actor_rollout_ref.rollout.calculate_log_probs", True
    ):
        raise ValueError(
            f"{SECTION}.behaviour_log_probs=rollout needs actor_rollout_ref.rollout.calculate_log_probs=true"
        )
