"""The stale@k seam inside verl's v1 trainer, on CPU: verl's real TransferQueue (local Ray),
verl's real batch balancing, checkpoint save/load and our trainer class; only the GPU workers
(actor forward, rollout servers) are replaced by stand-ins that write what they would write.

Each "generated" batch is a deterministic function of (step, index), shaped like verl's agent
loop output, so an uninterrupted run and a crashed-and-resumed one can be compared exactly.
"""

from __future__ import annotations

import json
import os
import types

import pytest
import torch
from hydra import compose, initialize_config_dir

from m2po.configs import config_dir

pytestmark = pytest.mark.ray

PROMPTS, N = 2, 2  # train_batch_size prompts x rollout.n responses
MINI = 1  # ppo_mini_batch_size -> u = 2 updates per step


def _config(tmp_path, staleness, warmup="base_policy", **extra):
    overrides = [
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
        f"data.train_batch_size={PROMPTS}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI}",
        f"actor_rollout_ref.rollout.n={N}",
        f"m2po.stale.staleness_updates={staleness}",
        f"m2po.stale.warmup={warmup}",
        "m2po.stale.behaviour_log_probs=rollout",
        f"trainer.default_local_dir={tmp_path}/ckpt",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="m2po_trainer", overrides=overrides)


def _generated_sample(step: int, prompt: int, session: int) -> dict:
    seed = step * 100 + prompt * 10 + session
    gen = torch.Generator().manual_seed(seed)
    prompt_len, response_len = 3 + prompt, 2 + (seed % 5)
    return {
        "prompts": torch.randint(0, 1000, (prompt_len,), generator=gen),
        "responses": torch.randint(0, 1000, (response_len,), generator=gen),
        "response_mask": torch.ones(response_len, dtype=torch.int64),
        "rollout_log_probs": -torch.rand(response_len, generator=gen),
        "rm_scores": torch.cat([torch.zeros(response_len - 1), torch.tensor([float(seed % 2)])]),
        "raw_prompt": [{"role": "user", "content": f"problem {step}.{prompt}"}],
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "reward_model": {"ground_truth": str(seed), "style": "rule"},
        "uid": f"s{step}p{prompt}",
        "session_id": session,
        "extra_fields": {"turns": [1, 2], "note": None},
    }


class _FakeWorkerGroup:
    """Stands in for the actor worker group: one data-parallel rank, no-op checkpoints."""

    def __init__(self):
        self._dispatch_info = {"actor": [0]}
        self.saved, self.loaded = [], []

    def save_checkpoint(self, local_path, *args, **kwargs):
        os.makedirs(local_path, exist_ok=True)
        self.saved.append(local_path)

    def load_checkpoint(self, local_path, **kwargs):
        self.loaded.append(local_path)


class _FakeDataLoader:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _trainer(config):
    from m2po.verl_integration.stale_trainer import StaleSyncTrainer

    trainer = StaleSyncTrainer(config)
    trainer.actor_rollout_wg = _FakeWorkerGroup()
    trainer.train_dataloader = _FakeDataLoader()
    trainer.tokenizer = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    trainer.global_steps = 0
    return trainer


def _generate(step: int, index: int):
    """What the agent loop and replay buffer hand the trainer: a batch in TransferQueue."""
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    samples, keys, tags = [], [], []
    for prompt in range(PROMPTS):
        for session in range(N):
            sample = _generated_sample(step * 10 + index, prompt, session)
            samples.append(sample)
            keys.append(f"{sample['uid']}_{session}_0")
            seq_len = sample["prompts"].numel() + sample["responses"].numel()
            tags.append({"status": "success", "seq_len": seq_len, "global_steps": step})
    tq.kv_batch_put(keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(samples), tags=tags)
    return KVBatchMeta(keys=keys, tags=tags, partition_id="train", extra_info={"temperature": 1.0})


def _run_steps(trainer, first: int, last: int, trained: dict, save_at=()):
    """verl's per-step calls around our seam; records what each step would train."""
    import transfer_queue as tq

    for step in range(first, last + 1):
        trainer.global_steps = step
        metrics = {}
        batch = trainer._compute_old_log_prob(_generate(step, 0), metrics)
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
        trained[step] = (sorted(list(data["uid"])), metrics)
        assert torch.equal(data["old_log_probs"].values(), data["rollout_log_probs"].values())
        if step in save_at:
            trainer._save_checkpoint()
        tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)  # as verl's fit does


@pytest.fixture(scope="module")
def transfer_queue():
    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
    yield tq
    tq.close()
    ray.shutdown()


def _warm_up(trainer):
    """What our on_train_begin does before step 1, with the rollout/actor calls stood in."""
    trainer.global_steps = 1
    for index in range(trainer.stale.staleness.delay_iterations):
        trainer._stash(trainer._record_behaviour_log_probs(_generate(0, index + 1), {}), trainer._current_version())


@pytest.mark.parametrize("warmup", ["base_policy", "fill_queue"])
def test_every_batch_is_trained_exactly_k_updates_after_generation(tmp_path, transfer_queue, warmup):
    k, u = 4, PROMPTS // MINI
    trainer = _trainer(_config(tmp_path, k, warmup))
    assert trainer.trainer_mode == "sync" and type(trainer.replay_buffer).__name__ == "ReplayBuffer"
    _warm_up(trainer)
    trained = {}
    _run_steps(trainer, 1, 6, trained)

    d = k // u
    staleness = [trained[s][1]["stale/staleness_updates"] for s in range(1, 7)]
    assert staleness == [0.0, 2.0, 4.0, 4.0, 4.0, 4.0]  # base-policy batches first, then exactly k
    # the batch trained at step s >= d + 1 is the one generated at step s - d
    for step in range(d + 1, 7):
        assert trained[step][0] == sorted(f"s{(step - d) * 10}p{p}" for p in range(PROMPTS) for _ in range(N))
    # warm-up batches (base policy, "step 0") are trained first, in order
    assert trained[1][0][0] == "s1p0" and trained[2][0][0] == "s2p0"
    assert trained[6][1]["stale/buffer_len"] == d
    # reward of the batch the current policy just generated (seeds make it session % 2): 0.5
    assert trained[3][1]["stale/fresh_score_mean"] == 0.5
    # nothing left in TransferQueue but the d queued batches' absence: all moved out
    assert transfer_queue.kv_list("train").get("train", {}) == {}
    # the ledger records every trained batch with its generating version
    from m2po.verl_integration.ledger import read_ledger

    ledger = read_ledger(os.path.join(tmp_path, "ckpt", "m2po_stale_ledger.jsonl"))
    assert [ledger[s]["staleness_updates"] for s in range(1, 7)] == [0, 2, 4, 4, 4, 4]
    assert ledger[5]["generated_at"] == {"global_step": 3, "updates": 4}


def test_restored_batch_is_bit_identical_in_transfer_queue(tmp_path, transfer_queue):
    trainer = _trainer(_config(tmp_path, 2))
    _warm_up(trainer)
    trainer.global_steps = 1
    trainer._compute_old_log_prob(_generate(1, 0), {})  # trains the warm-up batch
    trainer.global_steps = 2
    batch = trainer._compute_old_log_prob(_generate(2, 0), {})  # trains step 1's batch
    data = transfer_queue.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
    by_key = dict(zip(batch.keys, range(len(batch.keys))))
    for prompt in range(PROMPTS):
        for session in range(N):
            expected = _generated_sample(10, prompt, session)
            i = by_key[f"{expected['uid']}_{session}_0"]
            for field in ("prompts", "responses", "response_mask", "rollout_log_probs", "rm_scores"):
                got = data[field][i]
                assert got.dtype == expected[field].dtype and torch.equal(got, expected[field]), field
            assert data["raw_prompt"][i] == expected["raw_prompt"]
            assert data["reward_model"][i] == expected["reward_model"]
            assert data["extra_fields"][i] == expected["extra_fields"]
            assert data["session_id"][i] == session
    transfer_queue.kv_clear(keys=batch.keys, partition_id="train")


def test_crash_and_resume_trains_the_same_batch_sequence(tmp_path, transfer_queue):
    k = 6  # d = 3 queued batches
    steps, save_at = 9, 4
    uninterrupted = {}
    trainer = _trainer(_config(tmp_path / "a", k))
    _warm_up(trainer)
    _run_steps(trainer, 1, steps, uninterrupted)

    crashed = {}
    first = _trainer(_config(tmp_path / "b", k))
    _warm_up(first)
    _run_steps(first, 1, 6, crashed, save_at={save_at})  # steps 5-6 trained, then SIGKILL
    del first

    resumed = _trainer(_config(tmp_path / "b", k))
    resumed._load_checkpoint()
    assert resumed.global_steps == save_at and resumed._restored_buffer
    assert resumed.actor_rollout_wg.loaded == [str(tmp_path / "b" / "ckpt" / f"global_step_{save_at}" / "actor")]
    _run_steps(resumed, save_at + 1, steps, crashed)

    assert [crashed[s][0] for s in range(1, steps + 1)] == [uninterrupted[s][0] for s in range(1, steps + 1)]
    from m2po.verl_integration.ledger import read_ledger

    ledger_a = read_ledger(str(tmp_path / "a" / "ckpt" / "m2po_stale_ledger.jsonl"))
    ledger_b = read_ledger(str(tmp_path / "b" / "ckpt" / "m2po_stale_ledger.jsonl"))
    assert ledger_a == ledger_b  # same content hashes, versions and staleness at every step
    assert len({r["content_hash"] for r in ledger_a.values()}) == steps  # none duplicated


def test_resume_without_a_buffer_is_refused(tmp_path, transfer_queue):
    from m2po.buffer import CorruptCheckpointError

    trainer = _trainer(_config(tmp_path, 4))
    step_dir = tmp_path / "ckpt" / "global_step_3"
    (step_dir / "actor").mkdir(parents=True)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    with pytest.raises(CorruptCheckpointError, match="no m2po_stale_buffer"):
        trainer._load_checkpoint()


def test_buffers_of_checkpoints_verl_removed_are_pruned(tmp_path, transfer_queue):
    trainer = _trainer(_config(tmp_path, 2))
    _warm_up(trainer)
    trained = {}
    _run_steps(trainer, 1, 2, trained, save_at={1, 2})
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "global_step_1" / "m2po_stale_buffer" / "manifest.json").is_file()
    # verl's max_actor_ckpt_to_keep removed step 1's actor; the next save prunes its buffer
    import shutil

    shutil.rmtree(ckpt / "global_step_1" / "actor")
    trainer._save_checkpoint()
    assert not (ckpt / "global_step_1" / "m2po_stale_buffer").exists()
    assert (ckpt / "global_step_2" / "m2po_stale_buffer").is_dir()
    assert json.loads((ckpt / "latest_checkpointed_iteration.txt").read_text()) == 2


def test_ledger_survives_a_line_cut_by_a_crash(tmp_path):
    from m2po.verl_integration.ledger import append_ledger_record, read_ledger

    path = str(tmp_path / "deep" / "ledger.jsonl")
    append_ledger_record(path, {"global_step": 1, "content_hash": "a"})
    with open(path, "a") as f:
        f.write('{"global_step": 2, "conte')  # SIGKILL mid-write
    append_ledger_record(path, {"global_step": 2, "content_hash": "b"})
    assert read_ledger(path) == {1: {"global_step": 1, "content_hash": "a"}, 2: {"global_step": 2, "content_hash": "b"}}
    assert open(path).read().splitlines()[1] == '{"global_step": 2, "conte'


PROXIMAL = {
    "m2po.stale.recompute_proximal": "true",
    "actor_rollout_ref.actor.policy_loss.loss_mode": "decoupled_ppo",
    "algorithm.rollout_correction.rollout_is": "token",
    "algorithm.rollout_correction.rollout_is_threshold": "5e8",
}


def _proximal_log_probs(step: int, key: str, length: int) -> torch.Tensor:
    """What the stand-in actor's forward returns at `step` for one response: a function of both."""
    return -0.5 - 0.01 * step - 0.001 * torch.arange(length, dtype=torch.float32) - 0.0001 * (sum(map(ord, key)) % 97)


class _ActorWorkerGroup(_FakeWorkerGroup):
    """Also the actor's forward (verl's compute_log_prob): writes log-probs over prompt + response, as
    verl's workers do (the response's log-probs sit one position left of the response)."""

    step = 0

    def compute_log_prob(self, batch):
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["prompts", "responses"])
        full = []
        for key, prompt, response in zip(batch.keys, data["prompts"].unbind(), data["responses"].unbind()):
            lp = _proximal_log_probs(self.step, key, response.numel())
            full.append(torch.cat([torch.zeros(prompt.numel() - 1), lp, torch.zeros(1)]))
        nested = torch.nested.as_nested_tensor(full, layout=torch.jagged)
        from tensordict import TensorDict

        fields = TensorDict({"log_probs": nested, "entropy": nested.clone()}, batch_size=len(full))
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=fields)
        return batch


def test_recompute_proximal_trains_against_the_current_actor_with_the_behaviour_log_probs_kept(tmp_path, transfer_queue):
    """AReaL's decoupled PPO at stale@k: old_log_probs = the current actor's (pi_prox), rollout_log_probs =
    the behaviour log-probs of the batch's generation, and verl's rollout correction turns the gap into
    exact token weights pi_prox / pi_behav."""
    import numpy as np
    from verl import DataProto
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    k = 4
    config = _config(tmp_path, k, **PROXIMAL)
    trainer = _trainer(config)
    trainer.actor_rollout_wg = _ActorWorkerGroup()
    _warm_up(trainer)
    d = k // (PROMPTS // MINI)
    for step in range(1, 6):
        trainer.global_steps = trainer.actor_rollout_wg.step = step
        metrics = {}
        batch = trainer._compute_old_log_prob(_generate(step, 0), metrics)
        data = transfer_queue.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id)
        generated_at = step - d if step > d else step  # warm-up batch `step` ("s{step}p..") before d
        for i, key in enumerate(batch.keys):
            prompt, session = int(key.split("p")[1].split("_")[0]), int(key.split("_")[1])
            behaviour = _generated_sample(generated_at * 10 if step > d else step, prompt, session)["rollout_log_probs"]
            assert torch.equal(data["rollout_log_probs"][i], behaviour)
            assert torch.equal(data["old_log_probs"][i], _proximal_log_probs(step, key, behaviour.numel()))
        assert "actor/entropy" in metrics  # verl's own recompute ran
        padded = DataProto(batch=data.select("old_log_probs", "rollout_log_probs", "response_mask").to_padded_tensor())
        weighted, _ = compute_rollout_correction_and_add_to_batch(padded, config.algorithm.rollout_correction)
        mask = weighted.batch["response_mask"].bool()
        expected = (weighted.batch["old_log_probs"] - weighted.batch["rollout_log_probs"]).exp()
        np.testing.assert_allclose(weighted.batch["rollout_is_weights"][mask].numpy(), expected[mask].numpy(), rtol=1e-6)
        transfer_queue.kv_clear(keys=batch.keys, partition_id=batch.partition_id)


def test_recompute_proximal_with_the_papers_m2po_is_refused_at_construction(tmp_path, transfer_queue):
    config = _config(tmp_path, 4, **{**PROXIMAL, "actor_rollout_ref.actor.policy_loss.loss_mode": "m2po"})
    with pytest.raises(ValueError, match="recompute_proximal=true.*M2PO's mask would bound the wrong second moment"):
        _trainer(config)
