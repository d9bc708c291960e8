"""Staleness settings (stale@k) and policy versions, validated at start-up."""

from __future__ import annotations

from dataclasses import asdict, dataclass

# "base_policy": the paper's warm-up. Until a batch that is exactly k updates old exists, train on
#   rollouts of the base policy (fresh prompts each iteration; generated at the first iteration).
# "fill_queue": the authors' code. Generate without training until the queue holds k/u
#   iterations of batches, then train on the FIFO (the first k/u trained batches come from the
#   base policy with staleness 0, u, 2u, ...; exactly k from then on).
WARMUP_BASE_POLICY, WARMUP_FILL_QUEUE = "base_policy", "fill_queue"
WARMUP_MODES = (WARMUP_BASE_POLICY, WARMUP_FILL_QUEUE)


@dataclass(frozen=True)
class PolicyVersion:
    """Which policy generated a batch: the trainer's global step and its optimizer-update count."""

    global_step: int
    updates: int

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StalenessConfig:
    """stale@k: every batch is trained exactly `staleness_updates` model updates after the policy
    that generated it (after warm-up).

    Args:
        staleness_updates: k, in optimizer updates as in the paper (s=256); 0 is on-policy.
        updates_per_iteration: u, optimizer updates per training iteration (mini-batches per
            batch times PPO epochs); k must be a multiple of u.
        warmup: "base_policy" (paper) or "fill_queue" (authors' code), see WARMUP_MODES.
        key_prefix: config key prefix used in error messages.
    """

    staleness_updates: int
    updates_per_iteration: int
    warmup: str = WARMUP_BASE_POLICY
    key_prefix: str = "m2po.stale"

    def __post_init__(self):
        p = self.key_prefix
        for name in ("staleness_updates", "updates_per_iteration"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{p}.{name} must be an integer, got {value!r}")
        if self.staleness_updates < 0:
            raise ValueError(f"{p}.staleness_updates must be >= 0 (0 = on-policy), got {self.staleness_updates}")
        if self.updates_per_iteration < 1:
            raise ValueError(f"{p}.updates_per_iteration must be >= 1, got {self.updates_per_iteration}")
        if self.staleness_updates % self.updates_per_iteration:
            raise ValueError(
                f"{p}.staleness_updates={self.staleness_updates} is not a multiple of the "
                f"{self.updates_per_iteration} model updates per training iteration (mini-batches per batch "
                f"x PPO epochs); the nearest valid values are "
                f"{self.staleness_updates // self.updates_per_iteration * self.updates_per_iteration} and "
                f"{(self.staleness_updates // self.updates_per_iteration + 1) * self.updates_per_iteration}"
            )
        if self.warmup not in WARMUP_MODES:
            raise ValueError(f"{p}.warmup must be one of {list(WARMUP_MODES)}, got {self.warmup!r}")

    @property
    def delay_iterations(self) -> int:
        """k / u: how many iterations a batch waits between generation and training."""
        return self.staleness_updates // self.updates_per_iteration

    def to_json(self) -> dict:
        return {
            "staleness_updates": self.staleness_updates,
            "updates_per_iteration": self.updates_per_iteration,
            "warmup": self.warmup,
        }
