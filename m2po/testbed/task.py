"""The testbed tasks: n-digit addition with a verifiable answer, as a tiny character-level language.

Prompt `BOS a + b =` with zero-padded operands (every prompt has the same length, so batches need
no prompt padding). Two response formats:

- `addition`: the digits of `a + b` then EOS (3-4 tokens, every one a decision). Reward 1.0 for
  exactly the right digits followed by EOS.
- `copy_add`: the operands' digits restated `copies` times, then the digits of `a + b`, then EOS
  (20 tokens for 2 digits and 4 copies). Once learned, the restatement follows from the prompt token
  by token; only the few answer tokens are real decisions, as in an LLM's reasoning trace, where most
  tokens are near-deterministic. Reward on the final answer only: 1.0 when the tokens after the
  fixed-length restatement are exactly the sum's digits followed by EOS.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYMBOLS = [PAD, BOS, EOS, "+", "="] + [str(d) for d in range(10)]
TOKEN_ID = {s: i for i, s in enumerate(SYMBOLS)}
PAD_ID, BOS_ID, EOS_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS]
DIGIT_IDS = [TOKEN_ID[str(d)] for d in range(10)]


@dataclass(frozen=True)
class AdditionTask:
    """`num_digits`-digit addition; `response_len` = digits of the largest sum + EOS."""

    name: ClassVar[str] = "addition"
    num_digits: int = 3

    def __post_init__(self):
        if not 1 <= self.num_digits <= 6:
            raise ValueError(f"task.num_digits must be in 1..6, got {self.num_digits}")

    @property
    def prompt_len(self) -> int:
        return 1 + 2 * self.num_digits + 2

    @property
    def response_len(self) -> int:
        return self.num_digits + 2

    def sample_operands(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`(count, 2)` int64 operands, uniform in [0, 10**num_digits)."""
        return torch.randint(0, 10**self.num_digits, (count, 2), generator=generator)

    def encode_prompts(self, operands: torch.Tensor) -> torch.Tensor:
        """`(count, prompt_len)` token ids."""
        rows = []
        for a, b in operands.tolist():
            text = f"{a:0{self.num_digits}d}+{b:0{self.num_digits}d}="
            rows.append([BOS_ID] + [TOKEN_ID[c] for c in text])
        return torch.tensor(rows, dtype=torch.long)

    def describe(self) -> str:
        return f"{self.num_digits}-digit addition, answer only"

    def encode_answers(self, operands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct responses `(count, response_len)` (EOS then PAD) and their masks."""
        return self.encode_responses(operands, operands.sum(dim=1))

    def encode_responses(self, operands: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Well-formed responses `(count, response_len)` answering `answers` `(count,)` (right or
        not), and their masks."""
        return _encode_rows([self._response_prefix(pair) + _digits(value) for pair, value in
                             zip(operands.tolist(), answers.tolist())], self.response_len)

    def _response_prefix(self, pair: list[int]) -> list[int]:
        return []

    @property
    def answer_start(self) -> int:
        """Response position where the answer begins (what comes before it is not scored)."""
        return 0

    def rewards(self, operands: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """`(count,)` float: 1.0 where the tokens from `answer_start` on are exactly the sum's digits
        then EOS, and no EOS came earlier (the reward is on the final answer only)."""
        start = self.answer_start
        expected, expected_mask = _encode_rows([_digits(v) for v in operands.sum(dim=1).tolist()],
                                               self.response_len - start)
        answer, answer_mask = responses[:, start:], response_mask[:, start:]
        same = ((answer == expected) | ~expected_mask).all(dim=1) & (answer_mask == expected_mask).all(dim=1)
        ended_early = (response_mask[:, :start] & (responses[:, :start] == EOS_ID)).any(dim=1)
        return (same & ~ended_early).float()


@dataclass(frozen=True)
class CopyThenAddTask(AdditionTask):
    """Restate the operands `copies` times, then answer (see the module docstring)."""

    name: ClassVar[str] = "copy_add"
    num_digits: int = 2
    copies: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.copies <= 8:
            raise ValueError(f"task.copies must be in 1..8, got {self.copies}")

    @property
    def restatement_len(self) -> int:
        return 2 * self.num_digits * self.copies

    @property
    def response_len(self) -> int:
        return self.restatement_len + self.num_digits + 2

    def describe(self) -> str:
        return (f"{self.num_digits}-digit addition, operands restated {self.copies} times before the answer "
                f"({self.restatement_len} predictable + {self.num_digits + 1}-{self.num_digits + 2} answer tokens)")

    def _response_prefix(self, pair: list[int]) -> list[int]:
        a, b = pair
        return [TOKEN_ID[c] for c in f"{a:0{self.num_digits}d}{b:0{self.num_digits}d}"] * self.copies

    @property
    def answer_start(self) -> int:
        return self.restatement_len


TASKS = {task.name: task for task in (AdditionTask, CopyThenAddTask)}


def task_to_json(task: AdditionTask) -> dict:
    """The task's name and parameters, e.g. {"name": "copy_add", "num_digits": 2, "copies": 4}."""
    return {"name": task.name, **dataclasses.asdict(task)}


def task_from_json(data: dict) -> AdditionTask:
    """The inverse of `task_to_json`; an unknown name or parameter is refused by name."""
    fields = dict(data)
    name = fields.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"task name must be one of {list(TASKS)}, got {name!r}")
    return TASKS[name](**fields)


def _digits(value: int) -> list[int]:
    return [TOKEN_ID[c] for c in str(value)] + [EOS_ID]


def _encode_rows(rows: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for row, tokens in enumerate(rows):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = True
    return ids, mask
