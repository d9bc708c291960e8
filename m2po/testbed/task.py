"""The testbed task: n-digit addition with a verifiable answer, as a tiny character-level language.

Prompt `BOS a + b =` with zero-padded operands (every prompt has the same length, so batches need
no prompt padding); response: the digits of `a + b` then EOS. Reward 1.0 for exactly the right
digits followed by EOS, else 0.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYMBOLS = [PAD, BOS, EOS, "+", "="] + [str(d) for d in range(10)]
TOKEN_ID = {s: i for i, s in enumerate(SYMBOLS)}
PAD_ID, BOS_ID, EOS_ID = TOKEN_ID[PAD], TOKEN_ID[BOS], TOKEN_ID[EOS]
DIGIT_IDS = [TOKEN_ID[str(d)] for d in range(10)]
# The policy only ever emits digits or EOS (a logit mask, part of the policy itself).
RESPONSE_TOKEN_IDS = DIGIT_IDS + [EOS_ID]


@dataclass(frozen=True)
class AdditionTask:
    """`num_digits`-digit addition; `response_len` = digits of the largest sum + EOS."""

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

    def encode_answers(self, operands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct responses `(count, response_len)` (EOS then PAD) and their masks."""
        return self.encode_numbers(operands.sum(dim=1))

    def encode_numbers(self, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(numbers), self.response_len), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(numbers), self.response_len, dtype=torch.bool)
        for row, value in enumerate(numbers.tolist()):
            tokens = [TOKEN_ID[c] for c in str(value)] + [EOS_ID]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return ids, mask

    def rewards(self, operands: torch.Tensor, responses: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        """`(count,)` float: 1.0 where the response is exactly the sum's digits then EOS."""
        expected, expected_mask = self.encode_answers(operands)
        same = ((responses == expected) | ~expected_mask).all(dim=1) & (response_mask == expected_mask).all(dim=1)
        return same.float()
