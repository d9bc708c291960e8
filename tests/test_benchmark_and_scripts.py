"""The benchmark and the example launcher run and produce what they promise (not timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_benchmark_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_policy_loss.py"), "--sizes", "2048", "4096",
         "--response-len", "512", "--repeats", "2", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "m2po mask" in proc.stdout and "vanilla (GRPO eps=0.2)" in proc.stdout
    report = json.loads(out.read_text())
    assert [(row["regime"], row["tokens"]) for row in report["rows"]] == [
        ("typical", 2048), ("typical", 4096), ("stress", 2048), ("stress", 4096)
    ]
    for row in report["rows"]:
        assert set(row["median_ms"]) == {"vanilla (GRPO eps=0.2)", "m2po mask", "m2po clip", "no_trust_region"}
        assert row["ratio_to_vanilla"]["vanilla (GRPO eps=0.2)"] == 1.0
        if row["regime"] == "typical":
            assert 0 < row["masked_fraction"] < 0.02 and row["m2_before"] < 0.07
        else:  # M2 before masking over twice tau; the cut lies inside the bulk
            assert 0.05 < row["masked_fraction"] < 0.15 and 0.08 < row["m2_before"] < 0.1


def test_benchmark_rejects_sizes_that_do_not_divide():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_policy_loss.py"), "--sizes", "1000"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 2 and "multiple of --response-len" in proc.stderr


def test_example_launcher_dry_run_composes_the_config():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "train-scripts", "run_m2po.sh"), "--dry-run",
         "actor_rollout_ref.actor.policy_loss.m2po_variant=clip"],
        capture_output=True, text=True, env=dict(ENV, PATH=os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "m2po_variant: clip" in proc.stdout and "adv_estimator: grpo" in proc.stdout


def test_stale_buffer_benchmark_reports_every_phase(tmp_path):
    out = tmp_path / "buffer.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_stale_buffer.py"), "--batches", "4", "--sequences",
         "8", "--prompt-len", "16", "--response-len", "32", "--steps", "3", "--budget-gb", "0.00001",
         "--work-dir", str(tmp_path / "run"), "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checkpoint: incremental save" in proc.stdout and "resume: load" in proc.stdout
    report = json.loads(out.read_text())
    batch, steps = report["batch"], report["steps"]
    assert batch["compact_bytes"] < batch["raw_bytes"]
    # A ~10 KiB budget holds no whole batch: RAM is the next batch due (at most one more in flight).
    assert max(s["resident_bytes"] for s in steps) <= 2 * batch["compact_bytes"]
    # Every later save writes nothing: the pushed batch was spilled to the store on push.
    assert all(s["save_written_bytes"] == 0 and s["save_linked_entries"] == 4 for s in steps[1:])
    assert report["resume"]["entries"] == 4
    assert not os.path.exists(tmp_path / "run")  # the benchmark cleans up after itself


def test_minibatch_scope_benchmark_times_both_scopes_through_verls_engine(tmp_path):
    out = tmp_path / "scope.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_minibatch_scope.py"), "--repeats", "1", "--sequences",
         "4", "--micro-batch", "2", "--layers", "1", "--hidden", "64", "--response-len", "32", "--out", str(out)],
        capture_output=True, text=True, env={**ENV, "VERL_PLATFORM": "cpu"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| gradient checkpointing | forward (no grad) |" in proc.stdout
    report = json.loads(out.read_text())
    assert [r["gradient_checkpointing"] for r in report["rows"]] == [False, True]
    for row in report["rows"]:
        s = row["seconds"]
        assert row["extra_s"] == s["train mini_batch"] - s["train micro_batch"]
        assert row["forward_share_of_training_pass"] == s["forward"] / s["train micro_batch"]
