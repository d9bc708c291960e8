"""The embedded CPU testbed: the --quick main job end to end, and crash-safe resume (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from m2po.testbed.config import RLConfig, TestbedConfig, preset
from m2po.testbed.task import EOS_ID, PAD_ID, AdditionTask

ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
TINY = ["--methods", "m2po_stale", "--seeds", "0", "--workers", "1", "--iterations", "14", "--staleness", "8",
        "--checkpoint-every", "3", "--eval-every", "7", "--eval-problems", "32", "--sft-steps", "20"]


def _testbed(out, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "m2po.testbed", "--out", str(out), *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _records(out, run="m2po_stale-seed0"):
    with open(os.path.join(out, "runs", run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_quick_main_job_produces_table_and_plots(tmp_path):
    proc = _testbed(tmp_path / "quick", "--quick")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    out = tmp_path / "quick"
    for name in ("summary.md", "summary.json", "accuracy.png", "masked_fraction.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    config = preset("quick")
    assert set(summary["runs"]) == set(config.methods)
    k, u = config.rl.staleness_updates, config.rl.mini_batches
    for method in config.methods:
        records = _records(out, f"{method}-seed0")
        trained = [r for r in records if "trained_hash" in r]
        staleness = [r["stale/staleness_updates"] for r in trained]
        if method == "grpo_s0":
            assert staleness == [0] * len(records)
        else:  # paper warm-up: base-policy batches at 0, u, ..., then exactly k
            assert staleness == [min(i * u, k) for i in range(len(trained))]
        assert len({r["trained_hash"] for r in trained}) == len(trained)  # no batch trained twice
        # The same registered verl losses as the GPU path (their metric keys prove which ran).
        assert ("actor/m2po/m2_before" in trained[-1]) == (method in ("m2po_stale", "no_tr_stale"))
    assert "| M2PO, stale | 0 |" in (out / "summary.md").read_text()


def test_sigkill_then_same_command_resumes_to_the_uninterrupted_result(tmp_path):
    clean = _testbed(tmp_path / "clean", *TINY, "--logger", "tensorboard")
    assert clean.wait(timeout=600) == 0, clean.stdout.read()[-3000:]
    events = list((tmp_path / "clean" / "runs" / "m2po_stale-seed0" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0  # verl's tensorboard tracker got the metrics too

    crashed = tmp_path / "crashed"
    proc = _testbed(crashed, *TINY)
    metrics = crashed / "runs" / "m2po_stale-seed0" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill somewhere after the second checkpoint (iteration 6)
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 8:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (crashed / "runs" / "m2po_stale-seed0" / "done.json").exists()
    progress = json.loads((crashed / "runs" / "m2po_stale-seed0" / "checkpoint" / "progress.json").read_text())
    assert progress["iteration"] >= 6

    resumed = _testbed(crashed, *TINY)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]
    a, b = _records(tmp_path / "clean"), _records(crashed)
    assert [r.get("trained_hash") for r in a] == [r.get("trained_hash") for r in b]
    assert a == b  # losses, metrics and accuracies too: bit-for-bit the same run
    assert [r["iteration"] for r in b] == list(range(14))


def test_task_rewards_and_encoding():
    task = AdditionTask(2)
    operands = torch.tensor([[12, 34], [99, 99], [0, 5]])
    answers, mask = task.encode_answers(operands)
    assert task.rewards(operands, answers, mask).tolist() == [1.0, 1.0, 1.0]
    assert answers[1].tolist()[:4] == [task_id("1"), task_id("9"), task_id("8"), EOS_ID]
    wrong = answers.clone()
    wrong[0, 0] = task_id("5")
    unterminated = answers.clone()
    unterminated[2, 1] = task_id("0")  # "50..." no EOS where expected
    assert task.rewards(operands, wrong, mask).tolist() == [0.0, 1.0, 1.0]
    assert task.rewards(operands, unterminated, mask).tolist() == [1.0, 1.0, 0.0]
    assert (answers[2, 2:] == PAD_ID).all()


def task_id(char):
    from m2po.testbed.task import TOKEN_ID

    return TOKEN_ID[char]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(staleness_updates=10), r"rl.staleness_updates=10 is not a multiple of the 4 model updates per training"),
        (dict(mini_batches=3), "must be divisible by rl.mini_batches"),
        (dict(warmup="paper"), r"rl.warmup must be one of \['base_policy', 'fill_queue'\]"),
        (dict(lr=0.0), "rl.lr must be > 0"),
    ],
)
def test_bad_testbed_config(changes, message):
    with pytest.raises(ValueError, match=message):
        RLConfig(**changes)


def test_unknown_method():
    with pytest.raises(ValueError, match="allowed"):
        TestbedConfig(methods=("ppo",))
