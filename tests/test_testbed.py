"""The embedded CPU testbed: the --quick main job end to end, and crash-safe resume (SIGKILL)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from m2po.testbed.config import RLConfig, TestbedConfig, preset
from m2po.testbed.task import EOS_ID, PAD_ID, AdditionTask, CopyThenAddTask

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


@pytest.mark.parametrize("task", ["addition", "copy_add"])
def test_sigkill_then_same_command_resumes_to_the_uninterrupted_result(tmp_path, task):
    tiny = [*TINY, "--task", task]
    clean = _testbed(tmp_path / "clean", *tiny, "--logger", "tensorboard")
    assert clean.wait(timeout=600) == 0, clean.stdout.read()[-3000:]
    events = list((tmp_path / "clean" / "runs" / "m2po_stale-seed0" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0  # verl's tensorboard tracker got the metrics too

    crashed = tmp_path / "crashed"
    proc = _testbed(crashed, *tiny)
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

    resumed = _testbed(crashed, *tiny)
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


def test_copy_add_restates_the_operands_and_rewards_the_final_answer_only():
    task = CopyThenAddTask(num_digits=2, copies=3)
    assert (task.prompt_len, task.restatement_len, task.response_len) == (7, 12, 16)
    operands = torch.tensor([[7, 45], [99, 99]])
    responses, mask = task.encode_answers(operands)
    text = ["".join(task_char(i) for i, valid in zip(row, valid_row) if valid)
            for row, valid_row in zip(responses.tolist(), mask.tolist())]
    assert text == ["074507450745" "52</s>", "999999999999" "198</s>"]
    assert task.rewards(operands, responses, mask).tolist() == [1.0, 1.0]
    # the restatement is not scored...
    sloppy = responses.clone()
    sloppy[0, 3] = task_id("9")
    assert task.rewards(operands, sloppy, mask).tolist() == [1.0, 1.0]
    # ...the answer is, digit by digit, and so are its end and an EOS that cuts the restatement short
    wrong, early, unterminated = responses.clone(), responses.clone(), responses.clone()
    wrong[1, 13] = task_id("8")
    early[0, 5] = EOS_ID
    unterminated[0, 14] = task_id("3")  # "523..." where EOS was due
    for bad, row in ((wrong, 1), (early, 0), (unterminated, 0)):
        assert task.rewards(operands, bad, mask)[row] == 0.0
    # the SFT writes right and wrong answers in the same format
    wrong_answers, wrong_mask = task.encode_responses(operands, torch.tensor([53, 7]))
    assert task.rewards(operands, wrong_answers, wrong_mask).tolist() == [0.0, 0.0]
    assert torch.equal(wrong_answers[:, :12], responses[:, :12]) and wrong_mask[1].sum() == 12 + 2


@pytest.mark.parametrize("copies", [0, 9])
def test_copy_add_refuses_bad_copies(copies):
    with pytest.raises(ValueError, match="task.copies must be in 1..8"):
        CopyThenAddTask(copies=copies)


def test_second_moments_over_all_tokens_and_over_the_answer():
    from m2po.testbed.rl import second_moments

    behaviour = torch.zeros(2, 4)
    current = torch.tensor([[0.1, 0.2, 0.5, 9.0], [0.0, 0.3, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    out = second_moments(current, behaviour, mask, answer_start=2)
    assert out["testbed/m2_all"] == pytest.approx((0.01 + 0.04 + 0.25 + 0.09 + 1.0) / 7)
    assert out["testbed/m2_answer"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)


def task_char(token_id):
    from m2po.testbed.task import SYMBOLS

    return SYMBOLS[token_id]


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


def test_unknown_task_is_refused_by_name():
    with pytest.raises(ValueError, match=r"task must be one of \['addition', 'copy_add'\]"):
        preset("default", "subtraction")


def test_run_summary_and_report_table_on_hand_computed_records(tmp_path):
    from m2po.testbed.report import run_summary, write_report

    records = [
        {"iteration": 0, "updates": 4, "trained_hash": "a", "actor/pg_clipfrac": 0.02, "testbed/m2_all": 0.01,
         "testbed/m2_answer": 0.05},
        {"iteration": 1, "updates": 8, "accuracy": 0.30, "trained_hash": "b", "actor/pg_clipfrac": 0.04,
         "testbed/m2_all": 0.03, "testbed/m2_answer": 0.07},
        {"iteration": 2, "updates": 12, "accuracy": 0.20},
        {"iteration": 3, "updates": 16, "accuracy": 0.25},
    ]
    s = run_summary(records, base_accuracy=0.1)
    assert (s["peak"], s["final"], s["worst_drop"]) == (0.30, 0.25, pytest.approx(0.10))
    assert s["auc"] == pytest.approx(0.25) and s["updates"] == 16
    assert (s["masked_fraction"], s["m2_all"], s["m2_answer"]) == (pytest.approx(0.03), pytest.approx(0.02), pytest.approx(0.06))
    assert np.isnan(s["m2_before"])  # no M2PO statistic in these records

    other = [dict(r, **({"accuracy": r["accuracy"] + 0.1} if "accuracy" in r else {})) for r in records]
    config = TestbedConfig().to_json()
    path = write_report(str(tmp_path), 0.1, {"grpo_stale": {0: records, 1: other}}, config, "python -m m2po.testbed", 60.0)
    table = open(path).read()
    assert "| **GRPO, stale** | mean | 0.350 | 0.300 | 0.300 | 0.100 | 3.00% |" in table
    assert "| **GRPO, stale** | sd | 0.071 | 0.071 | 0.071 | 0.000 | 0.00% |" in table
    assert "Task: 2-digit addition, answer only;" in table
