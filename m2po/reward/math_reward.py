"""The paper's math reward: 1.0 if the last `\\boxed{...}` answer is mathematically equal to the
ground truth (checked with math-verify), optionally 0.1 for an extractable but wrong answer.

Wired into verl through its custom reward keys (the trainer config does this):

    reward.custom_reward_function.path=pkg://m2po.reward.math_reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.format_reward=0.1     # optional, paper: 0.1
"""

from __future__ import annotations

import threading

from math_verify import parse, verify


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else None."""
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command)
        if start < 0:
            continue
        i = start + len(command)
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text) or text[i] != "{":
            continue
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
        return None  # unbalanced: not extractable
    return None


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only works in the main thread; verl scores in an
    # executor thread, so there the timeout is off (parsing and verification are bounded anyway).
    return 5 if threading.current_thread() is threading.main_thread() else None


def is_equivalent(answer: str, ground_truth: str) -> bool:
    """math-verify equivalence of two LaTeX answers (fractions, radicals, intervals, units...)."""
    timeout = _timeout()
    gold = parse(f"\\boxed{{{ground_truth}}}", parsing_timeout=timeout)
    predicted = parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)
    if not gold or not predicted:
        return answer.strip() == ground_truth.strip()
    return bool(verify(gold, predicted, timeout_seconds=timeout))


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: dict | None = None,
    format_reward: float = 0.0,
    **kwargs,
) -> dict:
    """verl's custom reward signature. Returns `{"score", "acc", "extracted"}`: score 1.0 when
    correct, `format_reward` when a boxed answer was extracted but is wrong, 0.0 otherwise."""
    if not 0.0 <= format_reward < 1.0:
        raise ValueError(f"reward_kwargs.format_reward must be in [0, 1), got {format_reward}")
    extracted = last_boxed(solution_str)
    if extracted is None or not extracted:
        return {"score": 0.0, "acc": 0.0, "extracted": ""}
    correct = is_equivalent(extracted, str(ground_truth))
    return {"score": 1.0 if correct else float(format_reward), "acc": float(correct), "extracted": extracted}
