"""The details of verl that are not public API and that the verl integration relies on, in one place,
and the version guard that protects them.

Public extension points (the policy-loss registry, `register_trainer`, `PolicyLossConfig`, the
`verl.plugins` entry points, TransferQueue's kv API, `validate_config`) are used as documented. What
follows is not documented API; each was read in verl 0.9.1 and is guarded by `check_verl_version`,
which our trainers call before any worker starts, so another verl version stops with a message
instead of misbehaving. The CPU backend's own patches are listed in `m2po.cpu_backend.patches`.
"""

from __future__ import annotations

SUPPORTED_VERL_VERSION = "0.9.1"

# (what we rely on, where in verl 0.9.1, why)
VERL_INTERNALS = (
    (
        "PPOTrainer._compute_old_log_prob (overridden)",
        "trainer/ppo/v1/trainer_base.py:1634",
        "the stale@k seam (m2po_stale swaps the due batch in) and the async trainers' per-mini-batch "
        "staleness; called once per local step with the batch's KVBatchMeta",
    ),
    (
        "PPOTrainer._update_actor (extended)",
        "trainer/ppo/v1/trainer_base.py:1827",
        "the async trainers read the update's actor/* metrics for their ledger",
    ),
    (
        "PPOTrainer._save_checkpoint / _load_checkpoint (extended)",
        "trainer/ppo/v1/trainer_base.py:850,948",
        "the stale buffer goes into global_step_N/ before latest_checkpointed_iteration.txt is written",
    ),
    (
        "PPOTrainer.on_train_begin, replay_buffer.sample, _add_batch_to_generate, _compute_reward_colocate, "
        "_balance_batch",
        "trainer/ppo/v1/trainer_base.py",
        "m2po_stale's warm-up generates d base-policy batches before step 1 with verl's own calls",
    ),
    (
        "PPOTrainer.trainer_mode / parameter_sync_step / replay_buffer (reassigned after __init__)",
        "trainer/ppo/v1/trainer_base.py:129-131",
        "verl branches on the mode's name and reads trainer.v1.<mode>: our modes take the name of the "
        "verl mode they extend ('sync', 'separate_async', 'colocate_async')",
    ),
    (
        "PPOTrainer.global_steps, local_trigger_step",
        "trainer/ppo/v1/trainer_base.py:550",
        "the update count a batch is trained at (staleness in actor updates)",
    ),
    (
        "trajectory tags min_global_steps / max_global_steps",
        "workers/rollout/llm_server.py:161,348",
        "the weight versions that generated each sample (async staleness)",
    ),
    (
        "logging.getLogger('verl.trainer.ppo.v1.trainer_separate_async') quieted during _setup",
        "trainer/ppo/v1/trainer_separate_async.py:181",
        "logger.info(..., flush=True) raises TypeError with hybrid_engine=false whenever INFO is on",
    ),
    (
        "verl.utils.config.validate_config (wrapped)",
        "utils/config.py:88",
        "main_ppo's driver runs M2PO's start-up checks there, before Ray starts",
    ),
    (
        "verl.trainer.main_ppo.run_ppo (wrapped)",
        "trainer/main_ppo.py:34",
        "every entry point's driver calls it before Ray starts, the experimental off-policy ones included "
        "(fully_async_policy never calls validate_config): our losses are refused there",
    ),
    (
        "TRAINER_REGISTRY",
        "trainer/ppo/v1/trainer_base.py:1996",
        "trainer.v1.trainer_mode, resolved only in the TaskRunner, checked at start-up (late_names.py)",
    ),
    (
        "RolloutReplicaRegistry._registry",
        "workers/rollout/replica.py:315",
        "actor_rollout_ref.rollout.name, resolved only when the rollout starts, checked at start-up (late_names.py)",
    ),
    (
        "Tracking.__init__ (wrapped) and FileLogger's path and mode 'wb'",
        "utils/tracking.py:62,529",
        "a resumed run's earlier metrics are moved aside before verl truncates the file (metrics_attempts.py)",
    ),
    (
        "FSDPEngine.forward_backward_batch (wrapped): micro-batches cut from the mini-batch's TensorDict by "
        "prepare_micro_batches, the loss called per micro-batch",
        "workers/engine/fsdp/transformer_impl.py:724",
        "policy_loss.m2_scope=mini_batch: the forward without gradient over the mini-batch and the cut, stored as a "
        "field that verl's own micro-batching slices (minibatch_scope.py)",
    ),
    (
        "the actor's loss_function = partial(ppo_loss, config=actor config)",
        "workers/engine_workers.py:643",
        "the mini-batch scope reads the actor config (policy_loss) from the partial and refuses any other loss",
    ),
    (
        "no_padding_2_padding (log-probs of a no-padding batch, padded as ppo_loss pads them)",
        "workers/utils/padding.py:97",
        "the mini-batch scope pads the forward's log-probs exactly as the loss will see them",
    ),
    (
        "reduce_metrics: np.min / np.max for keys containing 'min' / 'max'",
        "utils/metric/utils.py:25",
        "our metric names avoid both substrings unless a max is meant (ratio_max)",
    ),
    (
        "rollout_corr_helper._parse_rollout_is_threshold's reading of a string with '_' (mirrored)",
        "trainer/ppo/rollout_corr_helper.py:93",
        "an IcePop band such as '1_1000000000' is not read as one number (behaviour_ratio.parse_is_threshold)",
    ),
)


def check_verl_version(subject: str) -> None:
    """Refuse any verl but the supported one, naming `subject` (what would break) and the fix."""
    import verl

    if verl.__version__ != SUPPORTED_VERL_VERSION:
        raise RuntimeError(
            f"{subject} relies on details of verl {SUPPORTED_VERL_VERSION} that are not public API "
            f"(m2po.verl_integration.verl_internals) and refuses verl {verl.__version__}: install "
            f"verl=={SUPPORTED_VERL_VERSION}"
        )
