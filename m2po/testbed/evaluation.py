"""Held-out accuracy of a testbed policy: what the SFT base policy and every RL run report."""

from __future__ import annotations

import torch

from m2po.testbed.model import sample
from m2po.testbed.task import AdditionTask


@torch.no_grad()
def evaluate(model, task: AdditionTask, problems: int, seed: int) -> float:
    """Accuracy of temperature-1 samples on a fixed held-out problem set (one sample each)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    operands = task.sample_operands(problems, generator)
    prompts = task.encode_prompts(operands)
    responses, mask = sample(model, prompts, task.response_len, generator)
    return float(task.rewards(operands, responses, mask).mean())
