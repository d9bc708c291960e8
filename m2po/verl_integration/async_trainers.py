"""verl's asynchronous v1 trainers with the behaviour-ratio check and measured staleness.

`trainer.v1.trainer_mode=m2po_separate_async` is verl 0.9.1's `separate_async` (a standalone rollout
pool generates while the trainer updates; weights sync every `parameter_sync_step` updates) and
`m2po_colocate_async` is its `colocate_async` (rollout and trainer share GPUs, with partial rollout);
each with three additions and nothing else changed:
- at construction, before any worker starts, `check_behaviour_ratio` refuses a configuration in
  which the loss would not see the ratio to the policy that generated the data;
- every trained mini-batch logs how many actor updates old its samples are, from verl's per-sample
  version tags (`stale/staleness_updates_min|mean|max`, next to the M2PO metrics);
- the staleness ledger (`<default_local_dir>/m2po_stale_ledger.jsonl`) gets one record per actor
  update: step, update index, staleness, weight versions, the prompt groups trained and the update's
  M2PO statistics, on the same axis as the stale@k trainer's records.

Staleness of a sample, in actor updates: the updates the trainer had made when it trains the sample
minus those it had made when the oldest weights that generated any of its tokens were synced
(verl's `min_global_steps` tag; with partial rollout a sample can span several versions).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_colocate_async import PPOTrainerColocateAsync
from verl.trainer.ppo.v1.trainer_separate_async import PPOTrainerSeparateAsync

from m2po.verl_integration.behaviour_ratio import check_behaviour_ratio
from m2po.verl_integration.ledger import LEDGER_FILE, append_ledger_record, staleness_metrics, staleness_summary
from m2po.verl_integration.policy_losses import METRIC_PREFIX
from m2po.verl_integration.trainer_modes import COLOCATE_ASYNC_TRAINER_MODE, SEPARATE_ASYNC_TRAINER_MODE
from m2po.verl_integration.verl_internals import check_verl_version

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

# Per-update statistics copied from the actor's metrics into the ledger.
LEDGER_ACTOR_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_loss", "actor/grad_norm")


def updates_per_local_step(config, parameter_sync_step: int) -> int:
    """Actor optimizer updates in one local step of verl's v1 loop (one replay-buffer sample)."""
    actor = config.actor_rollout_ref.actor
    prompts_per_local_step = config.data.train_batch_size // parameter_sync_step
    return prompts_per_local_step // actor.ppo_mini_batch_size * actor.ppo_epochs


def sample_staleness(tags: list[dict], updates_done: int, updates_per_version: int) -> list[int]:
    """Per non-padding sample: `updates_done` minus the updates behind its oldest generating weights
    (weight version v was synced after `v * updates_per_version` updates)."""
    return [
        updates_done - int(tag["min_global_steps"]) * updates_per_version
        for tag in tags
        if not tag.get("is_padding", False)
    ]


class _StalenessTracking:
    """Mixin over verl's asynchronous trainers (see the module docstring)."""

    VERL_TRAINER_MODE: str  # the verl mode this trainer extends

    def __init__(self, config):
        check_verl_version(f"trainer.v1.trainer_mode={config.trainer.v1.trainer_mode}")  # before any worker starts
        check_behaviour_ratio(config)
        super().__init__(config)
        # verl reads its mode's settings from trainer.v1.<trainer_mode> and branches on the mode's
        # name (replay buffer, refills, TransferQueue checkpoints); this trainer is verl's mode in
        # every respect, so it takes that name once verl has looked the class up.
        self.trainer_mode = self.VERL_TRAINER_MODE
        self.parameter_sync_step = config.trainer.v1.get(self.trainer_mode, {}).get("parameter_sync_step", 1)
        self.replay_buffer = self._build_replay_buffer()
        self._updates_per_local_step = updates_per_local_step(config, self.parameter_sync_step)
        # one weight version per global step: parameter_sync_step local steps
        self._updates_per_version = self._updates_per_local_step * self.parameter_sync_step
        self._trained: dict | None = None

    def _updates_done(self) -> int:
        """Actor updates made before the current local step (verl counts steps from 1)."""
        local_steps = (self.global_steps - 1) * self.parameter_sync_step + self.local_trigger_step
        return local_steps * self._updates_per_local_step

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        updates_done = self._updates_done()
        staleness = sample_staleness(batch.tags, updates_done, self._updates_per_version)
        summary = staleness_summary(staleness)
        metrics.update(staleness_metrics(summary))
        metrics["stale/staleness_updates"] = summary["staleness_updates_mean"]
        samples = [(key, tag) for key, tag in zip(batch.keys, batch.tags) if not tag.get("is_padding", False)]
        self._trained = {
            "global_step": self.global_steps,
            "local_step": self.local_trigger_step,
            "update": updates_done,
            **summary,
            "generated_at_version_min": min((int(tag["min_global_steps"]) for _, tag in samples), default=None),
            "generated_at_version_max": max((int(tag["max_global_steps"]) for _, tag in samples), default=None),
            "num_samples": len(samples),
            # verl's trajectory keys are {prompt uid}_{session}_{index}
            "prompt_uids": sorted({key.split("_", 1)[0] for key, _ in samples}),
        }
        return super()._compute_old_log_prob(batch, metrics)

    def _update_actor(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        batch = super()._update_actor(batch, metrics)
        if self._trained is not None:
            record = dict(self._trained)
            record.update({key: metrics[key] for key in LEDGER_ACTOR_METRICS if key in metrics})
            record.update({key: value for key, value in metrics.items() if key.startswith(METRIC_PREFIX)})
            append_ledger_record(os.path.join(self.config.trainer.default_local_dir, LEDGER_FILE), record)
            self._trained = None
        return batch


@contextmanager
def _quiet_logger(name: str):
    """Raise one logger's level for the duration (see `StalenessTrackingSeparateAsync._setup`)."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(logging.WARNING)
    try:
        yield
    finally:
        target.setLevel(level)


@register_trainer(SEPARATE_ASYNC_TRAINER_MODE)
class StalenessTrackingSeparateAsync(_StalenessTracking, PPOTrainerSeparateAsync):
    """verl's `separate_async` trainer + behaviour-ratio check, staleness metrics and ledger."""

    VERL_TRAINER_MODE = "separate_async"

    def _setup(self):
        if self._enable_hybrid_replicas:
            return super()._setup()
        # verl 0.9.1 logs the standalone-only set-up with logger.info(..., flush=True), which raises
        # TypeError whenever INFO is enabled (trainer_separate_async.py:181); that one logger is
        # quieted for the duration.
        with _quiet_logger(PPOTrainerSeparateAsync.__module__):
            super()._setup()
        logger.info(
            f"hybrid replicas disabled: rollout served by "
            f"{len(self.standalone_server_manager.get_replicas())} standalone replicas only"
        )


@register_trainer(COLOCATE_ASYNC_TRAINER_MODE)
class StalenessTrackingColocateAsync(_StalenessTracking, PPOTrainerColocateAsync):
    """verl's `colocate_async` trainer + behaviour-ratio check, staleness metrics and ledger."""

    VERL_TRAINER_MODE = "colocate_async"
