"""The `m2po.stale` config section: stale@k settings for verl's trainer, validated at start-up.

The section's schema and defaults are `StaleSectionConfig`, a dataclass in verl's `BaseConfig` style
(like `M2POPolicyLossConfig` for `policy_loss`); `configs/m2po_base.yaml` lists the same keys so that
they can be overridden without `+` (a test keeps the two equal). `stale_settings_from_config` checks
the section against the rest of the config, for the dry run, the start-up hook and the trainer alike;
every error names the key to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from verl.base_config import BaseConfig
from verl.utils.config import omega_conf_to_dataclass

from m2po.buffer import WARMUP_BASE_POLICY, StalenessConfig
from m2po.utils.config_values import config_value
from m2po.verl_integration.late_names import did_you_mean
from m2po.verl_integration.trainer_modes import STALE_TRAINER_MODE as TRAINER_MODE

BEHAVIOUR_LOG_PROBS = ("actor", "rollout")
SECTION = "m2po.stale"
SPILL_DIR_NAME = "m2po_stale_store"
DEFAULT_RAM_BUDGET_GB = 1.0


@dataclass
class StaleSectionConfig(BaseConfig):
    """`m2po.stale`.

    Args:
        staleness_updates (int): k, train every batch exactly this many actor updates after the policy
            that generated it (paper: 256); 0 = verl's sync trainer. Checked against u in
            `stale_settings_from_config`.
        warmup (str): "base_policy" (paper) or "fill_queue" (authors' code). In verl's trainer both
            train the same sequence (verl counts only training steps); the testbed tells them apart.
        behaviour_log_probs (str): "actor" (recomputed by the training engine when the batch is
            generated, as the authors do) or "rollout" (the rollout engine's own log-probs).
        ram_budget_gb (float, optional): GiB of queued batches kept in RAM besides the next batch
            due; the newer ones wait in `spill_dir`. None = no limit.
        spill_dir (str, optional): the buffer's store (each batch written once, hard-linked into
            checkpoints). None = `<trainer.default_local_dir>/m2po_stale_store`.
        recompute_proximal (bool): when a stale batch is trained, recompute old_log_prob with the
            current actor (the proximal policy of AReaL's decoupled PPO, one more forward pass per
            step) and hand the behaviour log-probs to verl's rollout correction as rollout_log_probs.
            False = the loss sees the behaviour log-probs directly (the paper's ratio).
    """

    staleness_updates: int = 0
    warmup: str = WARMUP_BASE_POLICY
    behaviour_log_probs: str = "actor"
    ram_budget_gb: Optional[float] = DEFAULT_RAM_BUDGET_GB
    spill_dir: Optional[str] = None
    recompute_proximal: bool = False

    def __post_init__(self):
        if self.behaviour_log_probs not in BEHAVIOUR_LOG_PROBS:
            raise ValueError(
                f"{SECTION}.behaviour_log_probs must be one of {list(BEHAVIOUR_LOG_PROBS)}, "
                f"got {self.behaviour_log_probs!r}"
            )
        if not isinstance(self.recompute_proximal, bool):
            raise ValueError(f"{SECTION}.recompute_proximal must be true or false, got {self.recompute_proximal!r}")
        if self.ram_budget_gb is not None and not self.ram_budget_gb > 0:
            raise ValueError(f"{SECTION}.ram_budget_gb must be > 0 or null (no limit), got {self.ram_budget_gb!r}")


def stale_section(config: DictConfig) -> StaleSectionConfig:
    """The validated `m2po.stale` section (the defaults when the config has none)."""
    section = OmegaConf.select(config, SECTION)
    if section is None:
        return StaleSectionConfig()
    try:
        return omega_conf_to_dataclass(section, StaleSectionConfig)
    except OmegaConfBaseException as error:  # its key is relative to the section and its text spans lines
        key = getattr(error, "key", None)
        reason = str(getattr(error, "msg", error)).splitlines()[0]
        known = [f.name for f in fields(StaleSectionConfig) if not f.name.startswith("_")]
        hint = "" if key is None or key in known else did_you_mean(key, known)
        raise ValueError(f"{SECTION if key is None else f'{SECTION}.{key}'}: {reason}{hint}") from None


@dataclass(frozen=True)
class StaleTrainerSettings:
    """What the stale@k trainer needs from the config.

    staleness: k and the warm-up, with u = updates per iteration derived from the actor's
        mini-batch structure.
    behaviour_log_probs: see `StaleSectionConfig`.
    ram_budget_bytes: compact bytes of queued batches kept in RAM besides the next batch due
        (None = no limit); the newer ones wait in the store, `spill_dir`.
    recompute_proximal: see `StaleSectionConfig`.
    """

    staleness: StalenessConfig
    behaviour_log_probs: str
    ram_budget_bytes: int | None
    spill_dir: str
    checkpoint_dir: str
    recompute_proximal: bool = False

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
    section = stale_section(config)
    checkpoint_dir = str(config_value(config, "trainer.default_local_dir", "checkpoints"))
    staleness = StalenessConfig(
        staleness_updates=section.staleness_updates,
        updates_per_iteration=updates_per_iteration(config),
        warmup=section.warmup,
        key_prefix=SECTION,
    )
    settings = StaleTrainerSettings(
        staleness=staleness,
        behaviour_log_probs=section.behaviour_log_probs,
        ram_budget_bytes=None if section.ram_budget_gb is None else int(section.ram_budget_gb * 2**30),
        spill_dir=str(section.spill_dir or os.path.join(checkpoint_dir, SPILL_DIR_NAME)),
        checkpoint_dir=checkpoint_dir,
        recompute_proximal=section.recompute_proximal,
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
    if trainer_mode == TRAINER_MODE:
        for section in (TRAINER_MODE, "sync"):  # verl reads trainer.v1.<mode>; our trainer runs sync's loop
            key = f"trainer.v1.{section}.parameter_sync_step"
            value = config_value(config, key, None)
            if value not in (None, 1):
                raise ValueError(
                    f"{key}={value}: trainer.v1.trainer_mode={TRAINER_MODE} syncs the rollout's weights after every "
                    f"step (1) and would silently ignore it; remove it (the staleness is {SECTION}.staleness_updates)"
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
            f"{TRAINER_MODE} (the buffer records the behaviour log-probs itself); to train against the rollout "
            f"engine's log-probs set {SECTION}.behaviour_log_probs=rollout"
        )
    if settings.behaviour_log_probs == "rollout" and not config_value(
        config, "actor_rollout_ref.rollout.calculate_log_probs", True
    ):
        raise ValueError(
            f"{SECTION}.behaviour_log_probs=rollout needs actor_rollout_ref.rollout.calculate_log_probs=true"
        )
