"""End to end through verl 0.9.1's real trainer on CPU (`python -m verl.trainer.main_ppo` with the
CPU backend and the tiny model): FSDP2 workers, the `hf` rollout, TransferQueue, weight sync,
checkpoints. Each run starts its own Ray cluster (~1-2 min each on 2 cores; the group ~10 min).

Run on its own with `pytest -m cpu_e2e`.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from m2po.verl_integration.stale_trainer import LEDGER_FILE, read_ledger
from tests.cpu_e2e import read_jsonl, run_main_ppo

pytestmark = pytest.mark.cpu_e2e

STALE_K, UPDATES_PER_STEP = 4, 2  # train_batch_size 4 / ppo_mini_batch_size 2
STALE_STEPS = 6
STALE = [
    "actor_rollout_ref.rollout.n=4",
    "data.train_batch_size=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    f"m2po.stale.staleness_updates={STALE_K}",
    f"trainer.total_training_steps={STALE_STEPS}",
    "trainer.save_freq=2",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("m2po-cache"))


def assert_ok(run):
    assert run.returncode == 0, run.tail()


def test_m2po_on_policy_through_verl_with_two_fsdp_workers(tmp_path, tiny_cache):
    run = run_main_ppo(
        str(tmp_path),
        "m2po-on-policy",
        ["actor_rollout_ref.rollout.n=4", "trainer.n_gpus_per_node=2"],  # FSDP2 over gloo, 2 rollout replicas
        tiny_cache,
    )
    assert_ok(run)
    steps = run.by_step()
    assert sorted(steps) == [1, 2, 3]
    for step, metrics in steps.items():
        # produced by our loss inside verl's FSDP workers
        for key in ("m2_before", "m2_after", "masked_fraction", "trust_region_fraction", "ratio_mean"):
            assert f"actor/m2po/{key}" in metrics, (step, key)
        assert math.isfinite(metrics["actor/pg_loss"])
        assert metrics["actor/grad_norm"] > 0
        assert metrics["stale/staleness_updates"] == 0
        # fp32 rollout vs bf16 actor on the same weights and tokens
        assert metrics["training/rollout_probs_diff_max"] < 1e-2
        assert metrics["training/rollout_actor_probs_pearson_corr"] > 0.99
    # one sync before step 1, then one after each update, to both replicas: the weights the
    # rollout samples from are the trained ones, and they change at every update
    syncs = run.rollout_syncs()
    by_version: dict[int, set] = {}
    for record in syncs:
        by_version.setdefault(record["weight_version"], set()).add((record["replica"], record["checksum"]))
    assert sorted(by_version) == [1, 2, 3, 4], syncs
    for version, seen in by_version.items():
        assert {replica for replica, _ in seen} == {0, 1} and len({c for _, c in seen}) == 1, (version, seen)
    assert len({next(iter(seen))[1] for seen in by_version.values()}) == 4
    # each step's 16 requests (4 prompts x 4) reach the 2 servers and are sampled in batches, not one by one
    served = [r for r in syncs if r["weight_version"] > 1]
    assert sum(r["requests_since_last_sync"] for r in served) == 3 * 16  # reported at the sync after each step
    assert sum(r["requests_since_last_sync"] for r in served) > 2 * sum(r["batches_since_last_sync"] for r in served)


@pytest.fixture(scope="module")
def uninterrupted_stale_run(tmp_path_factory, tiny_cache):
    workdir = str(tmp_path_factory.mktemp("stale"))
    return run_main_ppo(workdir, "uninterrupted", STALE, tiny_cache)


@pytest.mark.parametrize("warmup", ["base_policy", "fill_queue"])
def test_stale_k_staleness_through_verl(warmup, uninterrupted_stale_run, tmp_path, tiny_cache):
    if warmup == "base_policy":
        run = uninterrupted_stale_run  # base_policy is the default
    else:
        run = run_main_ppo(str(tmp_path), "fill-queue", [*STALE, f"m2po.stale.warmup={warmup}"], tiny_cache)
    assert_ok(run)
    ledger = read_ledger(os.path.join(run.output_dir, LEDGER_FILE))
    assert sorted(ledger) == list(range(1, STALE_STEPS + 1))
    warmup_steps = STALE_K // UPDATES_PER_STEP
    staleness = [ledger[step]["staleness_updates"] for step in range(1, STALE_STEPS + 1)]
    # warm-up batches come from the base policy; every later batch is exactly k updates old
    assert staleness == [min(STALE_K, (step - 1) * UPDATES_PER_STEP) for step in range(1, STALE_STEPS + 1)]
    assert staleness[warmup_steps:] == [STALE_K] * (STALE_STEPS - warmup_steps)
    logged = [run.by_step()[step]["stale/staleness_updates"] for step in range(1, STALE_STEPS + 1)]
    assert logged == staleness
    assert len({record["content_hash"] for record in ledger.values()}) == STALE_STEPS


def _raw_ledger(output_dir) -> list[dict]:
    return read_jsonl(os.path.join(output_dir, LEDGER_FILE))


def test_sigkill_and_resume_trains_what_an_uninterrupted_run_trains(uninterrupted_stale_run, tmp_path, tiny_cache):
    """Checkpoint at step 2, SIGKILL during step 3, resume: every step trains the same samples as an
    uninterrupted run (`samples_hash`); the queued batches come back bit-identical (`content_hash`,
    which also covers verl's per-run uuids and timings, so it is compared with the checkpointed
    buffer rather than with the other run); no step lost or repeated."""
    assert_ok(uninterrupted_stale_run)
    reference = read_ledger(os.path.join(uninterrupted_stale_run.output_dir, LEDGER_FILE))

    def after_step_3_started(output_dir):  # the step-2 checkpoint is complete by then
        path = os.path.join(output_dir, LEDGER_FILE)
        return os.path.exists(path) and 3 in read_ledger(path)

    crashed = run_main_ppo(str(tmp_path), "resumed", STALE, tiny_cache, kill_when=after_step_3_started)
    assert crashed.returncode == -9, crashed.tail()
    trained_before_crash = _raw_ledger(crashed.output_dir)
    with open(os.path.join(crashed.output_dir, "global_step_2", "m2po_stale_buffer", "manifest.json")) as f:
        queued = [entry["content_hash"] for entry in json.load(f)["entries"]]
    assert len(queued) == STALE_K // UPDATES_PER_STEP

    resumed = run_main_ppo(str(tmp_path), "resumed", STALE, tiny_cache)
    assert_ok(resumed)
    assert sorted(resumed.by_step()) == list(range(3, STALE_STEPS + 1))  # resumed after step 2
    raw = _raw_ledger(resumed.output_dir)
    after_resume = raw[len(trained_before_crash) :]
    assert [record["global_step"] for record in after_resume] == list(range(3, STALE_STEPS + 1))
    # the checkpointed queue, restored bit-identically, is trained first and in order
    assert [record["content_hash"] for record in after_resume[: len(queued)]] == queued
    # step 3, cut short by the crash, trains exactly the batch it trained before
    assert after_resume[0]["content_hash"] == trained_before_crash[-1]["content_hash"]
    ledger = read_ledger(os.path.join(resumed.output_dir, LEDGER_FILE))
    assert sorted(ledger) == sorted(reference)
    assert len({record["content_hash"] for record in ledger.values()}) == STALE_STEPS  # nothing trained twice
    for step in sorted(reference):
        for key in ("samples_hash", "generated_at", "staleness_updates"):
            assert ledger[step][key] == reference[step][key], (step, key)


def test_v0_trainer_on_cpu(tmp_path, tiny_cache):
    run = run_main_ppo(
        str(tmp_path),
        "v0",
        ["actor_rollout_ref.rollout.n=4", "trainer.use_v1=false", "trainer.total_training_steps=2"],
        tiny_cache,
    )
    assert_ok(run)
    steps = run.by_step()
    assert sorted(steps) == [1, 2]
    assert all("actor/m2po/m2_before" in metrics for metrics in steps.values())
