"""Rewards for math RL (plain Python + math-verify, no verl import)."""

from m2po.reward.math_reward import compute_score, last_boxed

__all__ = ["compute_score", "last_boxed"]
