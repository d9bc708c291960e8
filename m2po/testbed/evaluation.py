"""Held-out accuracy of a testbed policy: what the SFT base policy and every RL run report."""

from __future__ import annotations

import hashlib

import torch

from m2po.testbed.model import sample
from m2po.testbed.task import AdditionTask

PROBLEMS_SEED = 10_000  # + `seed`: the held-out problem set (verl's validation file holds seed 0's)


def held_out_problems(task: AdditionTask, problems: int, seed: int = 0) -> torch.Tensor:
    """`(problems, 2)` operands of the fixed held-out set."""
    return task.sample_operands(problems, torch.Generator().manual_seed(PROBLEMS_SEED + seed))


def draw_seed(*key) -> int:
    """A 63-bit seed for the sampling randomness of one evaluation, from what identifies it."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def evaluate(model, task: AdditionTask, problems: int, seed: int = 0, draw=0) -> float:
    """Accuracy of temperature-1 samples (one each) on the fixed held-out problem set `seed`.

    `draw` identifies the sampling randomness (a run passes its seed and the iteration). Each
    evaluation draws afresh: reusing one draw at every evaluation of every run (as this function did
    before the verl cross-check) shares one sampling error among all of them, which neither the mean
    over evaluations nor that over seeds averages out (measured on the base policy: 0.066 with that
    draw, 0.051 +- 0.008 over 20 others; docs/testbed-verl.md)."""
    operands = held_out_problems(task, problems, seed)
    prompts = task.encode_prompts(operands)
    generator = torch.Generator().manual_seed(draw_seed(seed, draw))
    responses, mask = sample(model, prompts, task.response_len, generator)
    return float(task.rewards(operands, responses, mask).mean())
