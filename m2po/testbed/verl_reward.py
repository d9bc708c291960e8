"""The testbed task's reward inside verl's reward loop: `reward.reward_manager.source=importlib`,
`module.path=pkg://m2po.testbed.verl_reward`, `name=TestbedRewardManager` (configs/testbed/verl.yaml).

The score is `task.rewards` itself, the function the testbed's own loop scores with, applied to the
response's token ids: verl's naive manager would hand a reward function the response decoded with
`skip_special_tokens=True`, which hides a PAD or BOS inside the answer and whether it ended with EOS.
Each data row carries what the score needs in `extra_info`: the operands and the task's definition.
"""

from __future__ import annotations

import torch
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

from m2po.testbed.task import task_from_json


def score_response(extra_info: dict, response_ids: list[int]) -> float:
    """1.0 or 0.0: the task's exact-match reward of one response (its valid tokens, EOS included)."""
    task = task_from_json(extra_info["task"])
    operands = torch.tensor([[int(extra_info["a"]), int(extra_info["b"])]])
    length = min(len(response_ids), task.response_len)
    responses = torch.zeros((1, task.response_len), dtype=torch.long)
    mask = torch.zeros((1, task.response_len), dtype=torch.bool)
    responses[0, :length] = torch.tensor(response_ids[:length], dtype=torch.long)
    mask[0, :length] = True
    if len(response_ids) > task.response_len:  # longer than any right answer
        return 0.0
    return float(task.rewards(operands, responses, mask)[0])


class TestbedRewardManager(RewardManagerBase):
    """verl reward manager: the testbed task's exact-match reward on token ids (`acc` = the score)."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, config, tokenizer, compute_score=None, **_reward_model_kwargs):
        # verl also passes the reward router's address and tokenizer (reward models); no model here
        super().__init__(config, tokenizer, compute_score)

    async def run_single(self, data) -> dict:
        item = data[-1]  # one sequence per call (verl's naive manager does the same)
        response_ids = item.batch["responses"]
        valid = int(item.batch["attention_mask"][-response_ids.shape[-1] :].sum())
        extra_info = item.non_tensor_batch["extra_info"]
        score = score_response(extra_info, response_ids[:valid].tolist())
        return {"reward_score": score, "reward_extra_info": {"acc": score}}
