"""Staleness-aware rollout buffer for stale@k training (plain PyTorch, no verl import)."""

from m2po.buffer.config import WARMUP_BASE_POLICY, WARMUP_FILL_QUEUE, WARMUP_MODES, PolicyVersion, StalenessConfig
from m2po.buffer.stale_buffer import ReadyBatch, StaleRolloutBuffer
from m2po.buffer.storage import CorruptCheckpointError, content_hash

__all__ = [
    "WARMUP_BASE_POLICY",
    "WARMUP_FILL_QUEUE",
    "WARMUP_MODES",
    "CorruptCheckpointError",
    "PolicyVersion",
    "ReadyBatch",
    "StaleRolloutBuffer",
    "StalenessConfig",
    "content_hash",
]
