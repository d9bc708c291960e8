"""End to end through verl 0.9.1's real trainer on CPU (`python -m verl.trainer.main_ppo` with the
CPU backend and the tiny model): FSDP2 workers, the `hf` rollout, TransferQueue, weight sync,
checkpoints, and verl's asynchronous separate_async trainer with a standalone rollout replica. Each
run starts its own Ray cluster (~1-2 min each on 2 cores; the group ~15 min).

Run on its own with `pytest -m cpu_e2e`.
"""

from __future__ import annotations

import json
import math
import os

import pytest

from m2po.cpu_backend import tiny
from m2po.cpu_backend.smoke import smoke_overrides
from m2po.data import PAPER_BENCHMARKS
from m2po.report import benchmark_average, load_run, main as report_main, validation_accuracy
from m2po.configs import compose as compose_config
from m2po.verl_integration.ledger import LEDGER_FILE, read_ledger
from tests.cpu_e2e import read_jsonl, run_main_ppo
from tests.test_behaviour_ratio import SCRIPT_OVERRIDES

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
    # validation before training and every 2 steps (greedy: its requests draw nothing from the
    # training requests' generators), so that the SIGKILL test has validation points on both sides
    "trainer.val_before_train=true",
    "trainer.test_freq=2",
]


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("m2po-cache"))


def assert_ok(run):
    assert run.returncode == 0, run.tail()


def test_m2po_on_policy_through_verl_with_two_fsdp_workers(tmp_path, tiny_cache, capsys):
    run = run_main_ppo(
        str(tmp_path),
        "m2po-on-policy",
        [
            "actor_rollout_ref.rollout.n=4",
            "trainer.n_gpus_per_node=2",  # FSDP2 over gloo, 2 rollout replicas
            "trainer.val_before_train=true",  # validation before training and after every step,
            "trainer.test_freq=1",  # on the tiny val set named after the paper's 8 benchmarks,
            "actor_rollout_ref.rollout.val_kwargs.do_sample=true",  # sampled at temperature 1, so the
            "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",  # accuracies differ between steps
        ],
        tiny_cache,
    )
    assert_ok(run)
    steps = {step: m for step, m in run.by_step().items() if step > 0}
    assert sorted(steps) == [1, 2, 3]
    for step, metrics in steps.items():
        # produced by our loss inside verl's FSDP workers
        for key in ("m2_before", "m2_after", "masked_fraction", "trust_region_fraction", "ratio_mean"):
            assert f"actor/m2po/{key}" in metrics, (step, key)
        # the cut was decided over the whole mini-batch, both workers together (m2_scope=mini_batch)
        assert 0 <= metrics["actor/m2po/cut_m2_after"] <= 0.04
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
    # reported at the sync after each step; with the validations before training and after steps 1 and
    # 2 (16 prompts, 1 sample each; the one after step 3 follows the last sync)
    assert sum(r["requests_since_last_sync"] for r in served) == 3 * 16 + 3 * tiny.VAL_ROWS
    assert sum(r["requests_since_last_sync"] for r in served) > 2 * sum(r["batches_since_last_sync"] for r in served)
    # `m2po report` on what verl logged: the 8 benchmarks, the best of 4 evaluations, the table
    metrics_file = os.path.join(run.output_dir, "metrics-0.jsonl")
    accuracy = {s: validation_accuracy(m) for s, m in run.by_step().items()}
    assert sorted(accuracy) == [0, 1, 2, 3] and all(set(a) == set(PAPER_BENCHMARKS) for a in accuracy.values())
    assert len({round(benchmark_average(a)[0], 6) for a in accuracy.values()}) > 1  # a real choice of best step
    capsys.readouterr()
    assert report_main([metrics_file, "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    best = max(sorted(accuracy), key=lambda s: benchmark_average(accuracy[s])[0])
    row = [f"{100 * accuracy[best][b]:.1f}" for b in PAPER_BENCHMARKS]
    average = f"{100 * benchmark_average(accuracy[best])[0]:.1f}"
    clipped = f"{100 * sum(m['actor/pg_clipfrac'] for m in steps.values()) / 3:.2f}"
    assert f"| metrics-0 | {best} | " + " | ".join(row) + f" | {average} | {clipped} |" in printed
    assert len(os.listdir(tmp_path / "report")) == 6  # report.md, report.json, 4 plots


@pytest.fixture(scope="module")
def uninterrupted_stale_run(tmp_path_factory, tiny_cache):
    workdir = str(tmp_path_factory.mktemp("stale"))
    return run_main_ppo(workdir, "uninterrupted", STALE, tiny_cache)


def test_stale_k_staleness_through_verl(uninterrupted_stale_run):
    """The paper's warm-up (the default); the authors' (`fill_queue`) is checked the same way by the
    stale run of tests/test_verl_learning.py."""
    run = uninterrupted_stale_run
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

    # both attempts log where verl's file logger logs by default, as the paper scripts do
    crashed = run_main_ppo(str(tmp_path), "resumed", STALE, tiny_cache, kill_when=after_step_3_started,
                           shared_metrics_file=True)
    assert crashed.returncode == -9, crashed.tail()
    logged_before_crash = {record["step"] for record in crashed.metrics}
    trained_before_crash = _raw_ledger(crashed.output_dir)
    with open(os.path.join(crashed.output_dir, "global_step_2", "m2po_stale_buffer", "manifest.json")) as f:
        queued = [entry["content_hash"] for entry in json.load(f)["entries"]]
    assert len(queued) == STALE_K // UPDATES_PER_STEP

    resumed = run_main_ppo(str(tmp_path), "resumed", STALE, tiny_cache, shared_metrics_file=True)
    assert_ok(resumed)
    # resumed after step 2: validated there again, then trained steps 3-6
    assert sorted(resumed.by_step()) == list(range(2, STALE_STEPS + 1))
    assert "metrics of the previous attempt kept" in resumed.log
    # no metric lost: `m2po report` on the run folder merges the crashed attempt (kept beside it by the
    # plugin before verl truncated the file) with the resumed one
    assert {0, 1, 2} <= logged_before_crash
    report = load_run(str(tmp_path / "resumed"))
    assert sorted(report.steps) == list(range(STALE_STEPS + 1))
    validated = sorted(step for step, metrics in report.steps.items() if validation_accuracy(metrics))
    assert validated == [0, 2, 4, 6]  # step 0 only in the crashed attempt, 4 and 6 only in the resumed one
    assert report.notes[0] == "2 attempts (a crash or a stop, then a resume) merged"
    raw = _raw_ledger(resumed.output_dir)
    after_resume = raw[len(trained_before_crash) :]
    assert [record["global_step"] for record in after_resume] == list(range(3, STALE_STEPS + 1))
    # the checkpointed queue, restored bit-identically, is trained first and in order
    assert [record["content_hash"] for record in after_resume[: len(queued)]] == queued
    # the steps trained after the step-2 checkpoint and lost with the crash (step 3, cut short; step 4 too
    # when the kill lands a step late) train exactly the batches they trained before
    lost = {record["global_step"]: record["content_hash"] for record in trained_before_crash if record["global_step"] > 2}
    assert 3 in lost
    assert {r["global_step"]: r["content_hash"] for r in after_resume if r["global_step"] in lost} == lost
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


# ------------------------------------------------------------------ verl's separate_async trainer

ASYNC_STEPS = 4
UPDATES_PER_VERSION = 4  # the scripts' parameter_sync_step, one update per local step
ASYNC_TEST = [
    f"trainer.total_training_steps={ASYNC_STEPS}",
    # large enough that a few updates move the tiny policy visibly; a small tau so that the mask acts
    "actor_rollout_ref.actor.optim.lr=1e-3",
    "actor_rollout_ref.actor.policy_loss.m2_threshold=0.01",
]


def _async_script_overrides(script: str, *extra: str) -> list[str]:
    """What `train-scripts/async/<script> --cpu-smoke` runs: the smoke settings, the script's own, then ours."""
    overrides = SCRIPT_OVERRIDES[script]
    smoke = [o for o in smoke_overrides(compose_config("m2po_paper", overrides)) if o != "+cpu=tiny"]  # run_main_ppo adds it
    return [*smoke, *overrides, *ASYNC_TEST, *extra]


def _async_run(workdir, name, script, cache, *extra, **kwargs):
    return run_main_ppo(workdir, name, _async_script_overrides(script, *extra), cache, config_name="m2po_paper", **kwargs)


def _updates(output_dir) -> list[dict]:
    """The ledger's records in file order (a line cut by a SIGKILL is skipped)."""
    return read_jsonl(os.path.join(output_dir, LEDGER_FILE), skip_cut_lines=True)


def _check_staleness_bookkeeping(records):
    for record in records:
        assert record["update"] == (record["global_step"] - 1) * UPDATES_PER_VERSION + record["local_step"]
        # the oldest generating weights (version v: synced after 4v updates) give the largest staleness
        assert record["staleness_updates_max"] == record["update"] - UPDATES_PER_VERSION * record["generated_at_version_min"]
        assert record["staleness_updates_min"] <= record["staleness_updates_mean"] <= record["staleness_updates_max"]
        assert record["num_samples"] > 0 and record["prompt_uids"]


def test_async_m2po_trains_against_the_policy_that_generated_the_data(tmp_path, tiny_cache):
    """`async/m2po_separate_async.sh --cpu-smoke`: verl's separate_async with a standalone `hf` replica,
    weights synced through the object store. The loss sees pi_theta / pi_behav (bypass mode): on the
    first update of a sync window, where the trainer's snapshot ratio is exactly 1, M2 is already that
    of a policy several updates old, and the mask acts."""
    run = _async_run(str(tmp_path), "async-m2po", "m2po_separate_async.sh", tiny_cache)
    assert_ok(run)
    steps = run.by_step()
    assert sorted(steps) == list(range(1, ASYNC_STEPS + 1))
    records = _updates(run.output_dir)
    assert [r["update"] for r in records] == list(range(ASYNC_STEPS * UPDATES_PER_VERSION))
    _check_staleness_bookkeeping(records)
    assert max(r["staleness_updates_max"] for r in records) >= UPDATES_PER_VERSION  # rollouts run ahead
    fresh = records[0]  # update 0: the initial weights generated the data and are being trained
    assert fresh["staleness_updates_max"] == 0
    window_starts = [r for r in records if r["local_step"] == 0 and r["staleness_updates_min"] > 0]
    assert window_starts
    for record in window_starts:
        # the snapshot ratio would be exactly 1 here (M2 = 0; see the decoupled run below); the
        # behaviour ratio carries the staleness
        assert record["actor/m2po/m2_all_before"] > max(1e-3, 10 * fresh["actor/m2po/m2_all_before"]), record
        assert record["actor/m2po/ratio_max"] > 1.01, record
    assert any(r["actor/m2po/m2_before"] > 0 for r in window_starts)
    assert any(r["actor/m2po/masked_fraction"] > 0 for r in records)
    for step, metrics in steps.items():  # logged next to the M2PO metrics
        in_step = [r for r in records if r["global_step"] == step]
        assert metrics["stale/staleness_updates_max"] == max(r["staleness_updates_max"] for r in in_step)
        assert metrics["stale/staleness_updates_min"] == min(r["staleness_updates_min"] for r in in_step)
        assert "actor/m2po/m2_before" in metrics and "actor/m2po/masked_fraction" in metrics
    # the standalone replica got the trained weights once before step 1 and after every step
    syncs = run.rollout_syncs()
    assert [r["weight_version"] for r in syncs] == list(range(1, ASYNC_STEPS + 2))
    assert [r["global_steps"] for r in syncs] == list(range(ASYNC_STEPS + 1))
    assert len({r["checksum"] for r in syncs}) == ASYNC_STEPS + 1


def test_async_decoupled_run_survives_sigkill_and_resumes_without_training_anything_twice(tmp_path, tiny_cache):
    """`async/m2po_decoupled_separate_async.sh --cpu-smoke` (AReaL's variant, verl's decoupled mode):
    checkpoint at step 2 (verl saves the TransferQueue with the queued rollouts), SIGKILL once step 3
    trains, resume. The run continues at step 3, trains rollouts that were queued before the crash,
    and no prompt group trained up to the checkpoint is trained again."""
    workdir = str(tmp_path)

    def step_3_trained(output_dir):
        path = os.path.join(output_dir, LEDGER_FILE)
        return os.path.exists(path) and any(r["global_step"] == 3 for r in read_jsonl(path, skip_cut_lines=True))

    crashed = _async_run(workdir, "decoupled", "m2po_decoupled_separate_async.sh", tiny_cache, "trainer.save_freq=2",
                         kill_when=step_3_trained)
    assert crashed.returncode == -9, crashed.tail()
    assert os.path.isdir(os.path.join(crashed.output_dir, "global_step_2", "transfer_queue"))
    before = _updates(crashed.output_dir)
    resumed = _async_run(workdir, "decoupled", "m2po_decoupled_separate_async.sh", tiny_cache, "trainer.save_freq=2")
    assert_ok(resumed)
    assert sorted(resumed.by_step()) == list(range(3, ASYNC_STEPS + 1))
    after = _updates(resumed.output_dir)[len(before) :]
    assert [r["update"] for r in after] == list(range(2 * UPDATES_PER_VERSION, ASYNC_STEPS * UPDATES_PER_VERSION))
    _check_staleness_bookkeeping(before + after)
    checkpointed = [r for r in before if r["global_step"] <= 2]
    assert [r["update"] for r in checkpointed] == list(range(2 * UPDATES_PER_VERSION))
    trained_before = {uid for r in checkpointed for uid in r["prompt_uids"]}
    trained_after = [uid for r in after for uid in r["prompt_uids"]]
    assert not trained_before & set(trained_after)  # nothing trained into the checkpoint is trained again
    assert len(trained_after) == len(set(trained_after))
    # rollouts queued before the crash (generated by weights older than the checkpoint's) are trained after it
    assert any(r["generated_at_version_min"] < 2 for r in after)
    moved = 0
    for attempt in (before, after):  # AReaL's variant in verl's decoupled mode
        # old_log_prob is the trainer's snapshot at the start of the window: r = pi_theta / pi_prox is 1
        # on the window's first update and moves away from 1 once the trainer has had a gradient in it
        # (a window whose earlier updates all had zero advantages, as at step 1 when no rollout is rewarded
        # yet, leaves fresh Adam weights where they were and r at 1)
        had_gradient: dict[int, bool] = {}
        for record in attempt:
            step = record["global_step"]
            if record["local_step"] == 0:
                assert abs(record["actor/m2po/ratio_max"] - 1.0) < 1e-3, record
                had_gradient[step] = False
            elif had_gradient.get(step):
                assert record["actor/m2po/ratio_max"] > 1.01, record
                moved += 1
            had_gradient[step] = had_gradient.get(step, False) or record.get("actor/grad_norm", math.inf) > 0
            assert record["actor/m2po/trust_region_fraction"] == 1.0  # every token is a candidate
    assert moved > 0  # the check above did run
    assert any(r["actor/m2po/masked_fraction"] > 0 for r in before + after)
    assert any(r["actor/m2po/behaviour_ratio_max"] > 1.1 for r in before + after)  # pi_prox / pi_behav reached the loss
