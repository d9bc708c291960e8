"""The `m2po_cpu` checkpoint engine: weights from the trainer to standalone rollout replicas on CPU.

verl's asynchronous `separate_async` trainer syncs weights to its standalone rollout pool through a
checkpoint engine (NCCL, NIXL, Mooncake, ... on GPUs; `naive` only works for colocated rollouts).
This one goes through Ray's object store: every training rank walks verl's full-tensor generator (with
FSDP the walk is a collective), rank 0 puts the state dict into the object store once and posts the
reference to a per-job mailbox actor, and every rollout worker takes it from there. Registered through
verl's public `CheckpointEngineRegistry` when the CPU backend is active; selected with
`actor_rollout_ref.rollout.checkpoint_engine.backend=m2po_cpu`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

BACKEND = "m2po_cpu"
MAILBOX_NAME = "m2po_cpu_weight_mailbox"


class WeightMailbox:
    """Ray actor: hands one posted state-dict reference per sync to that sync's receivers."""

    def __init__(self):
        self._posted: dict[str, list] = {}
        self._waiting_receivers: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}

    def _event(self, sync_id: str) -> asyncio.Event:
        return self._events.setdefault(sync_id, asyncio.Event())

    async def post(self, sync_id: str, receivers: int, refs: list) -> None:
        self._posted[sync_id] = refs
        self._waiting_receivers[sync_id] = receivers
        self._event(sync_id).set()

    async def take(self, sync_id: str) -> list:
        await self._event(sync_id).wait()
        refs = self._posted[sync_id]
        self._waiting_receivers[sync_id] -= 1
        if self._waiting_receivers[sync_id] == 0:  # the last receiver frees the sync's entry
            del self._posted[sync_id], self._waiting_receivers[sync_id], self._events[sync_id]
        return refs


def _mailbox():
    import ray

    return ray.remote(WeightMailbox).options(name=MAILBOX_NAME, get_if_exists=True, num_cpus=0).remote()


def _engine_class():
    import ray
    from verl.checkpoint_engine.base import CheckpointEngine
    from verl.workers.rollout.utils import ensure_async_iterator

    class ObjectStoreCheckpointEngine(CheckpointEngine):
        """verl `CheckpointEngine` over Ray's object store (see the module docstring)."""

        def __init__(self, bucket_size: int = 0, is_master: bool = False, **_unused):
            self.is_master = is_master
            self._mailbox = None
            self._sync_id = None
            self._receivers = 0

        def prepare(self) -> dict[str, Any]:
            return {}

        @classmethod
        def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
            mailbox, sync_id = _mailbox(), uuid.uuid4().hex
            shared = {"mailbox": mailbox, "sync_id": sync_id, "receivers": rollout_world_size}
            actor = {key: [value] * actor_wg_world_size for key, value in shared.items()}
            rollout = {key: [value] * rollout_world_size for key, value in shared.items()}
            return actor, rollout

        def init_process_group(self, mailbox, sync_id: str, receivers: int):
            self._mailbox, self._sync_id, self._receivers = mailbox, sync_id, receivers

        def finalize(self):
            self._mailbox = self._sync_id = None

        async def send_weights(self, weights, global_steps: int | None = None):
            # Every rank walks the generator: with FSDP, gathering full tensors is collective.
            state_dict = {}
            async for name, tensor in ensure_async_iterator(weights):
                state_dict[name] = tensor.detach().to("cpu", copy=True)
            if self.is_master:
                # Inside a list, the reference is passed on rather than resolved by Ray.
                await self._mailbox.post.remote(self._sync_id, self._receivers, [ray.put(state_dict)])
            return {}

        async def receive_weights(self, global_steps: int | None = None):
            (ref,) = await self._mailbox.take.remote(self._sync_id)
            state_dict = await ref
            for name, tensor in state_dict.items():
                yield name, tensor

    ObjectStoreCheckpointEngine.__module__ = __name__
    return ObjectStoreCheckpointEngine


def register_checkpoint_engine() -> None:
    """Register `m2po_cpu` in verl's checkpoint-engine registry (idempotent)."""
    from verl.checkpoint_engine.base import CheckpointEngineRegistry

    try:
        CheckpointEngineRegistry.get(BACKEND)
    except ValueError:
        CheckpointEngineRegistry.register(BACKEND)(_engine_class())
