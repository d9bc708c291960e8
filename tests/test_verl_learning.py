"""Learning through verl's own trainer: from the testbed's SFT base policy, a short on-policy GRPO run
and a short stale@k M2PO run of verl's `main_ppo` on CPU (`python -m m2po.testbed --engine verl`'s
runner) must raise verl's validation accuracy well beyond the evaluation's noise.

The two runs go at once (one per core). What a run needs to learn is everything a user's run needs:
prompts rendered by verl's chat handling, the rollout server's samples, the reward paired with the
response it scores, GRPO advantages, the stale buffer handing back the batch with its own behaviour
log-probs and rewards, the loss inside verl's FSDP actor, weights synced back to the rollout. A scratch
run with the rewards scored against the wrong problems (the pairing broken) does not pass
(docs/testbed-verl.md, "The learning test").
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from m2po.testbed.config import preset
from m2po.testbed.sft import base_policy
from m2po.testbed.verl_engine import accuracy_key, read_run, run_method, write_data
from m2po.verl_integration.ledger import LEDGER_FILE, read_ledger

pytestmark = pytest.mark.cpu_e2e

STEPS = 24
STALENESS = 8  # updates: two warm-up batches, then every batch is 8 updates (two steps) old
EVAL_PROBLEMS = 512
# Settings of a short run that learns (docs/testbed-verl.md): the default task and model, a shorter
# SFT, a larger learning rate.
CONFIG = dataclasses.replace(
    preset("default"),
    engine="verl",
    methods=("grpo_s0", "m2po_stale"),
    seeds=(0,),
    sft=dataclasses.replace(preset("default").sft, steps=1000),
    rl=dataclasses.replace(preset("default").rl, iterations=STEPS, lr=3e-4, staleness_updates=STALENESS,
                           eval_every=STEPS, eval_problems=EVAL_PROBLEMS, checkpoint_every=STEPS),
)
# An improvement of at least this much: more than 4 standard errors of the difference between two
# evaluations on 512 problems at the accuracies seen (0.07 before, ~0.3 after: sd of the difference 0.024).
MARGIN = 0.10


def difference_standard_error(before: float, after: float, problems: int) -> float:
    return math.sqrt(before * (1 - before) / problems + after * (1 - after) / problems)


def test_the_margin_is_well_beyond_the_evaluations_noise():
    assert MARGIN > 4 * difference_standard_error(0.07, 0.3, EVAL_PROBLEMS)


def test_grpo_and_stale_m2po_through_main_ppo_raise_validation_accuracy(tmp_path):
    import torch

    torch.set_num_threads(1)
    base = base_policy(CONFIG, str(tmp_path / "cache"), progress=False)
    train_file, val_file = write_data(CONFIG, str(tmp_path / "data"))
    runs = {method: str(tmp_path / method) for method in CONFIG.methods}
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(run_method, CONFIG, method, 0, base, train_file, val_file, run_dir, 900)
                   for method, run_dir in runs.items()]
        for future in futures:
            future.result()
    key = accuracy_key(CONFIG)
    for method, run_dir in runs.items():
        steps, notes = read_run(run_dir)
        assert sorted(steps) == list(range(STEPS + 1)) and not notes, (method, notes)
        before, after = steps[0][key], steps[STEPS][key]
        assert after - before >= MARGIN, f"{method}: validation accuracy {before:.3f} -> {after:.3f}"
    # the stale run trained what it was meant to: base-policy batches, then batches exactly k updates old
    ledger = read_ledger(os.path.join(runs["m2po_stale"], LEDGER_FILE))
    updates = CONFIG.rl.mini_batches
    assert [ledger[s]["staleness_updates"] for s in range(1, STEPS + 1)] == [
        min(STALENESS, (s - 1) * updates) for s in range(1, STEPS + 1)
    ]
    assert len({r["samples_hash"] for r in ledger.values()}) == STEPS
