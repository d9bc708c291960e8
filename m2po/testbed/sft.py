"""Supervised warm-up to a weak base policy, cached on disk by everything it depends on."""

from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

from m2po.utils.atomic_io import atomic_directory
from m2po.testbed.config import TestbedConfig
from m2po.testbed.evaluation import evaluate
from m2po.testbed.model import build_model, load_pretrained, response_log_probs, save_pretrained


BASE_DRAWS = 4


def _sft_targets(task, operands: torch.Tensor, correct_fraction: float, generator: torch.Generator):
    """Answers that are right `correct_fraction` of the time, else a random wrong number of the
    same number of digits (a weak but well-formed policy)."""
    sums = operands.sum(dim=1)
    digits = torch.tensor([len(str(s)) for s in sums.tolist()])
    low = torch.where(digits > 1, 10 ** (digits - 1), torch.zeros_like(digits))
    random = low + (torch.rand(len(sums), generator=generator) * (10**digits - low)).long()
    random = torch.where(random == sums, (random + 1 - low) % (10**digits - low) + low, random)
    correct = torch.rand(len(sums), generator=generator) < correct_fraction
    return task.encode_responses(operands, torch.where(correct, sums, random))


def base_policy(config: TestbedConfig, cache_dir: str, progress: bool = True) -> str:
    """Directory of the warmed-up base policy (`save_pretrained` format), built once per config."""
    path = os.path.join(cache_dir, f"base-{config.base_policy_key()}")
    if os.path.isfile(os.path.join(path, "testbed_base.json")):
        return path
    task, sft = config.task, config.sft
    model = build_model(config.model, config.base_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sft.lr)
    generator = torch.Generator().manual_seed(config.base_seed)
    model.train()
    for _ in tqdm(range(sft.steps), desc="SFT warm-up", disable=None if progress else True, leave=False):
        operands = task.sample_operands(sft.batch_size, generator)
        answers, mask = _sft_targets(task, operands, sft.correct_fraction, generator)
        log_probs = response_log_probs(model, task.encode_prompts(operands), answers)
        loss = -(log_probs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # the mean of BASE_DRAWS evaluations: the reference every run's curve starts from
    accuracy = sum(evaluate(model, task, config.rl.eval_problems, seed=0, draw=("base", d)) for d in range(BASE_DRAWS))
    accuracy /= BASE_DRAWS
    with atomic_directory(path) as tmp:
        save_pretrained(model, tmp)
        with open(os.path.join(tmp, "testbed_base.json"), "w") as f:
            json.dump({"accuracy": accuracy, "config": config.to_json()}, f, indent=1)
    return path


def load_base(path: str):
    model = load_pretrained(path)
    model.eval()
    with open(os.path.join(path, "testbed_base.json")) as f:
        return model, json.load(f)["accuracy"]
