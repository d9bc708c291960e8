"""stale@k inside verl's v1 trainer: `trainer.v1.trainer_mode=m2po_stale`.

verl's synchronous trainer with one seam: right after the behaviour log-probs of a freshly
generated batch are known (`_compute_old_log_prob`), the batch (all its TransferQueue fields,
rewards included) moves into the `StaleRolloutBuffer`, and the batch that is due, generated
exactly k actor updates earlier, moves back into TransferQueue in its place. Reference
log-probs, values, advantages and the actor/critic updates then run on it unchanged, with
whatever loss mode is configured. With `m2po.stale.staleness_updates=0` this is verl's sync
trainer plus `stale/*` metrics.

With `m2po.stale.recompute_proximal=true` the trained batch's old_log_prob is then recomputed by the
current actor (the proximal policy of AReaL's decoupled PPO), and its behaviour log-probs reach the
loss through verl's rollout correction instead.

Also: the warm-up (d = k/u base-policy batches generated before the first update), the buffer
saved inside every verl checkpoint (`global_step_N/m2po_stale_buffer`) before verl marks the
checkpoint complete and restored on resume, and a ledger of trained batches
(`<default_local_dir>/m2po_stale_ledger.jsonl`: step, generating version, staleness, content
hash) for auditing runs and resumes.
"""

from __future__ import annotations

import glob
import logging
import os

import transfer_queue as tq
from tqdm import tqdm
from transfer_queue import KVBatchMeta

from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from m2po.buffer import CorruptCheckpointError, PolicyVersion, ReadyBatch, StaleRolloutBuffer
from m2po.utils.atomic_io import remove_directory, remove_leftovers
from m2po.verl_integration.behaviour_ratio import check_behaviour_ratio
from m2po.verl_integration.ledger import (
    LEDGER_FILE,
    append_ledger_record,
    samples_hash,
    staleness_metrics,
    staleness_summary,
)
from m2po.verl_integration.stale_settings import TRAINER_MODE, stale_settings_from_config
from m2po.verl_integration.verl_internals import check_verl_version
from m2po.verl_integration.transfer_queue_codec import decode_batch, encode_batch

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

BUFFER_DIR = "m2po_stale_buffer"


@register_trainer(TRAINER_MODE)
class StaleSyncTrainer(PPOTrainerSync):
    """verl's sync trainer, training every batch exactly k actor updates after it was generated."""

    def __init__(self, config):
        check_verl_version(f"trainer.v1.trainer_mode={TRAINER_MODE}")  # before any worker starts
        check_behaviour_ratio(config)
        self.stale = stale_settings_from_config(config)
        super().__init__(config)
        # verl branches on the literal "sync" (replay buffer, TransferQueue checkpoints); this
        # trainer is sync in every respect except the seam below.
        self.trainer_mode = "sync"
        self.parameter_sync_step = 1
        self.replay_buffer = self._build_replay_buffer()
        self.stale_buffer = StaleRolloutBuffer(
            self.stale.staleness,
            ram_budget_bytes=self.stale.ram_budget_bytes,
            spill_dir=self.stale.spill_dir,
        )
        self._restored_buffer = False

    # ------------------------------------------------------------------ versions

    @property
    def updates_per_iteration(self) -> int:
        return self.stale.staleness.updates_per_iteration

    def _current_version(self) -> PolicyVersion:
        """The policy that generates (and is updated in) the current step: steps start at 1."""
        return PolicyVersion(global_step=self.global_steps, updates=(self.global_steps - 1) * self.updates_per_iteration)

    # ------------------------------------------------------------------ the seam

    def _compute_old_log_prob(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        batch = self._record_behaviour_log_probs(batch, metrics)
        if not self.stale.enabled:
            metrics.update({"stale/staleness_updates": 0.0, "stale/target_staleness_updates": 0.0})
            metrics.update(staleness_metrics(staleness_summary([0.0])))
            return self._recompute_proximal(batch, metrics)
        current = self._current_version()
        fresh = self._stash(batch, current)
        metrics["stale/fresh_score_mean"] = fresh_score_mean(fresh, batch.tags)
        ready = self.stale_buffer.pop_ready(current)
        if ready is None:
            raise RuntimeError(
                f"m2po stale buffer holds {len(self.stale_buffer)} batches at step {self.global_steps}, none due; "
                f"the warm-up did not run (was the buffer checkpoint removed?)"
            )
        metrics.update(self.stale_buffer.metrics())
        metrics.update(staleness_metrics(staleness_summary([ready.staleness_updates])))
        keys, tags, samples = decode_batch(ready.batch)
        self._append_ledger(ready, samples)
        batch = self._unstash(keys, tags, samples, extra_info=batch.extra_info, metrics=metrics)
        return self._recompute_proximal(batch, metrics)

    def _record_behaviour_log_probs(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        if self.stale.behaviour_log_probs == "actor":
            return super()._compute_old_log_prob(batch, metrics)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["rollout_log_probs"])
        data["old_log_probs"] = data.pop("rollout_log_probs")
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data)
        return batch

    def _recompute_proximal(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """With `m2po.stale.recompute_proximal`: the batch's behaviour log-probs become rollout_log_probs
        and verl's own recompute with the current actor fills old_log_probs (pi_prox), so verl's
        rollout correction weighs each token by pi_prox / pi_behav (decoupled mode)."""
        if not self.stale.recompute_proximal:
            return batch
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
        data["rollout_log_probs"] = data.pop("old_log_probs")
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=data)
        return super()._compute_old_log_prob(batch, metrics)

    def _stash(self, batch: KVBatchMeta, version: PolicyVersion):
        """Move a generated batch (every field, behaviour log-probs and rewards included) out of
        TransferQueue into the stale buffer."""
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
        self.stale_buffer.push(encode_batch(data, batch.keys, batch.tags), version)
        tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)
        return data

    def _unstash(self, keys: list, tags: list, samples: list[dict], extra_info: dict, metrics: dict) -> KVBatchMeta:
        stored = tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples), tags=tags)
        batch = KVBatchMeta(keys=keys, tags=tags, partition_id="train", fields=stored.fields, extra_info=extra_info)
        # Re-balance for the current data-parallel layout (a resume may change it).
        return self._balance_batch(batch, metrics=metrics)

    # ------------------------------------------------------------------ warm-up

    def on_train_begin(self):
        super().on_train_begin()
        if not self.stale.enabled or self._restored_buffer:
            return
        # Both warm-ups queue d base-policy batches before the first update: "base_policy" (paper)
        # trains on them from step 1; "fill_queue" (authors' code) generates them without
        # training. verl counts only training steps, so here the two give the same sequence.
        needed = self.stale.staleness.delay_iterations
        version = self._current_version()
        logger.info(f"m2po stale@{self.stale.staleness.staleness_updates}: generating {needed} base-policy batches")
        for _ in tqdm(range(needed), desc="m2po stale warm-up (base-policy batches)", disable=False):
            self._add_batch_to_generate()
            batch, _ = self.replay_buffer.sample(
                global_steps=self.global_steps, partition_id="train", batch_size=self.config.data.train_batch_size
            )
            self.on_sample_end()  # sync trainer: rollout replicas sleep while the actor runs
            if self.reward_loop_manager.reward_loop_worker_handles is None:
                batch = self._compute_reward_colocate(batch, metrics={})
            batch = self._balance_batch(batch, metrics={})
            self._stash(self._record_behaviour_log_probs(batch, metrics={}), version)
            self.checkpoint_manager.update_weights(self.global_steps)  # wake the replicas again

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self):
        step_dir = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        if self.stale.enabled:
            # Before verl writes latest_checkpointed_iteration.txt, so a checkpoint that verl
            # considers complete always has its buffer.
            report = self.stale_buffer.save(os.path.join(step_dir, BUFFER_DIR))
            logger.info(
                f"m2po stale buffer checkpoint: {report.entries} batches, {report.written_bytes / 2**20:.1f} MiB "
                f"written, {report.linked_entries} linked from the store, {report.copied_entries} copied"
            )
        super()._save_checkpoint()
        self._prune_buffers_of_removed_checkpoints()

    def _prune_buffers_of_removed_checkpoints(self) -> None:
        """verl's max_actor_ckpt_to_keep removes old actor folders; their buffers go with them (and
        the batches only they linked leave the disk). Leftovers of crashed saves or removals too."""
        for step_dir in glob.glob(os.path.join(self.config.trainer.default_local_dir, "global_step_*")):
            buffer_dir = os.path.join(step_dir, BUFFER_DIR)
            remove_leftovers(buffer_dir)
            if os.path.isdir(buffer_dir) and not os.path.isdir(os.path.join(step_dir, "actor")):
                remove_directory(buffer_dir)

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.global_steps == 0 or not self.stale.enabled:
            return
        step_dir = self._resumed_step_dir()
        buffer_dir = os.path.join(step_dir, BUFFER_DIR)
        if not os.path.isdir(buffer_dir):
            raise CorruptCheckpointError(
                f"resuming stale@{self.stale.staleness.staleness_updates} from {step_dir}, which has no {BUFFER_DIR}/: "
                f"the queued rollouts would be lost. Resume from a checkpoint written by trainer.v1.trainer_mode="
                f"{TRAINER_MODE} with the same m2po.stale settings, or start fresh (trainer.resume_mode=disable)"
            )
        self.stale_buffer.load(buffer_dir)
        self._restored_buffer = True
        logger.info(f"restored {len(self.stale_buffer)} stale batches from {buffer_dir}")

    def _resumed_step_dir(self) -> str:
        if self.config.trainer.resume_mode == "resume_path":
            step_dir = self.config.trainer.resume_from_path
        else:
            step_dir = find_latest_ckpt_path(self.config.trainer.default_local_dir)
        return step_dir if os.path.isabs(step_dir) else os.path.join(os.getcwd(), step_dir)

    # ------------------------------------------------------------------ ledger

    def _append_ledger(self, ready: ReadyBatch, samples: list[dict]) -> None:
        record = {
            "global_step": self.global_steps,
            "generated_at": ready.version.to_json(),
            "staleness_updates": ready.staleness_updates,
            **staleness_summary([ready.staleness_updates]),
            "content_hash": ready.content_hash,
            "samples_hash": samples_hash(samples),
        }
        append_ledger_record(os.path.join(self.config.trainer.default_local_dir, LEDGER_FILE), record)


def fresh_score_mean(data, tags: list[dict]) -> float:
    """Mean sequence reward of the batch the current policy just generated (the trained batch's
    rewards are those of a policy k updates old); NaN if the batch carries no rewards."""
    if "rm_scores" not in data.keys():
        return float("nan")
    scores = [s.sum().item() for s, tag in zip(data["rm_scores"].unbind(), tags, strict=True) if not tag.get("is_padding")]
    return sum(scores) / len(scores) if scores else float("nan")
