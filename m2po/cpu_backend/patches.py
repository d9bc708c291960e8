"""The patches of verl 0.9.1 private details that the CPU backend needs, applied only when it is
active (`VERL_PLATFORM=cpu`) and only on verl 0.9.1 (checked by `m2po.cpu_backend.activate`).

Everything else goes through verl's extension points (platform, engine and rollout-replica
registries, `BaseRollout`). `PATCHES` is the list the README prints; keep the two in step.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random

import torch

# The v1 replay buffer's poll interval on CPU (verl: 2 s). A poll is one metadata read from TransferQueue.
# The environment variable sets another (e.g. 2 to time verl's own behaviour).
POLL_INTERVAL_S = 0.05
POLL_INTERVAL_ENV = "M2PO_CPU_REPLAY_POLL_S"
# "0" keeps verl's per-request Continuous Token warning (to time verl's own behaviour)
LOG_FILTER_ENV = "M2PO_CPU_LOG_FILTER"
# Worker groups' torch.distributed master ports are drawn from [floor, the kernel's ephemeral range):
# above `ray start`'s worker ports (10002-19999; a local ray.init's are ephemeral) and never handed out by the kernel.
MASTER_PORT_FLOOR = 20000
MASTER_PORT_WINDOW = 1000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"

PATCHES = (
    (
        "torch.distributed.init_process_group",
        "verl asks for the backend 'cpu:gloo,<device>:<backend>', which is 'cpu:gloo,cpu:gloo' on CPU and "
        "torch rejects; collapsed to 'gloo' (verl/utils/distributed.py:63,89).",
    ),
    (
        "verl.single_controller.ray.base.RayWorkerGroup._get_master_addr_port",
        "verl draws each worker group's MASTER_PORT with bind(0) and frees it; the TCPStore listens on it only "
        "when the workers' init_model runs, seconds later, and in between any connect() on the machine may be "
        "given the same ephemeral port (seen once in CI: EADDRINUSE at init_process_group). Without "
        "`master_port_range` set, a window of verl's own port scan is drawn below the kernel's ephemeral "
        "range instead (base.py:91,520).",
    ),
    (
        "verl.workers.engine.fsdp.transformer_impl.CPUOffloadPolicy",
        "the reference model's FSDP2 offload asks for pinned memory, which needs an accelerator; "
        "pin_memory=False on CPU (transformer_impl.py:462).",
    ),
    (
        "verl.utils.model.load_valuehead_model",
        "the critic loader hard-codes attn_implementation='flash_attention_2'; 'sdpa' on CPU (utils/model.py:649,674).",
    ),
    (
        "verl.workers.rollout.base._ROLLOUT_REGISTRY",
        "the BaseRollout registry is a private dict; the 'hf' rollout adds its adapter there (rollout/base.py:89).",
    ),
    (
        "verl.utils.fsdp_utils.fsdp2_sharded_save_to_cpu",
        "the decoupled-PPO snapshot of separate_async (DetachActorWorker.save_model_to_cpu) copies each shard with "
        "`.cpu()`, which on CPU returns the live parameter itself: the 'frozen' proximal policy moved with every "
        "update (measured: pi_theta / pi_prox == 1 at every update); the CPU shards are cloned (fsdp_utils.py:1167,1180).",
    ),
    (
        "verl.trainer.ppo.v1.replay_buffer.ReplayBuffer.__init__",
        f"the v1 replay buffer polls TransferQueue every 2 s while it waits for a batch (replay_buffer.py:144,409), "
        f"which was most of a CPU step; the poll interval is {POLL_INTERVAL_S} s on CPU (no config key sets it; "
        f"${POLL_INTERVAL_ENV} overrides it).",
    ),
    (
        "environment: TQ_NUM_THREADS",
        "TransferQueue asks torch for 8 threads per put and get (TQ_NUM_THREADS) and, on a machine with fewer "
        "physical cores, warns on every call (one log line per sample, forwarded by Ray) before using the "
        "physical count; set to the physical cores (at most 8) in the driver's environment, which the local Ray "
        "cluster's workers inherit, unless already set.",
    ),
    (
        "logging: verl.utils.tokenizer.continuous_token_wiring",
        "verl's agent loop builds a Continuous Token builder per request and warns each time that a llama "
        "model_type has no model-specific one (continuous_token_wiring.py:210); on CPU that warning, one log line "
        f"per sample forwarded by Ray, is filtered out (the generic builder is the right one for the tiny models; "
        f"{LOG_FILTER_ENV}=0 keeps it).",
    ),
)


def _collapse_gloo_backend(backend):
    """'cpu:gloo,cpu:gloo' -> 'gloo'; anything else unchanged."""
    if isinstance(backend, str) and "," in backend:
        parts = {part.split(":")[-1] for part in backend.split(",")}
        if parts == {"gloo"}:
            return "gloo"
    return backend


def _patch_init_process_group() -> None:
    original = torch.distributed.init_process_group
    if getattr(original, "_m2po_cpu_patch", False):
        return

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = _collapse_gloo_backend(kwargs["backend"])
        elif args:
            args = (_collapse_gloo_backend(args[0]), *args[1:])
        return original(*args, **kwargs)

    init_process_group._m2po_cpu_patch = True
    torch.distributed.init_process_group = init_process_group


def ephemeral_port_floor(path: str = EPHEMERAL_RANGE_FILE) -> int | None:
    """The lowest port the kernel hands out on its own, or None where it cannot be read."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def master_port_window(ephemeral_floor: int | None, rng: random.Random | None = None) -> list[int] | None:
    """`[start, end)` for verl's master-port scan, inside [MASTER_PORT_FLOOR, ephemeral_floor); None (verl's
    own bind(0)) where that range cannot hold a window. The start is random so that worker groups created
    before any of them listens do not all scan to the same first free port; drawn from the OS by default, so
    neither a seeded run nor its resume repeats it and the run's own `random` state is left untouched."""
    if ephemeral_floor is None or ephemeral_floor - MASTER_PORT_FLOOR < 2 * MASTER_PORT_WINDOW:
        return None
    start = (rng or random.SystemRandom()).randrange(MASTER_PORT_FLOOR, ephemeral_floor - MASTER_PORT_WINDOW)
    return [start, start + MASTER_PORT_WINDOW]


def _patch_master_port_choice() -> None:
    from verl.single_controller.ray.base import RayWorkerGroup

    original = RayWorkerGroup._get_master_addr_port
    if getattr(original, "_m2po_cpu_patch", False):
        return

    @functools.wraps(original)
    def _get_master_addr_port(self, pg, bundle_index=0, master_port_range=None):
        if master_port_range is None:
            master_port_range = master_port_window(ephemeral_port_floor())
        return original(self, pg, bundle_index=bundle_index, master_port_range=master_port_range)

    _get_master_addr_port._m2po_cpu_patch = True
    RayWorkerGroup._get_master_addr_port = _get_master_addr_port


def _patch_offload_policy() -> None:
    from verl.workers.engine.fsdp import transformer_impl

    original = transformer_impl.CPUOffloadPolicy
    if original is None or getattr(original, "_m2po_cpu_patch", False):
        return

    class UnpinnedCPUOffloadPolicy(original):
        _m2po_cpu_patch = True

        def __init__(self, pin_memory: bool = False):
            super().__init__(pin_memory=False)

    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


@contextlib.contextmanager
def _sdpa_instead_of_flash_attention():
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("attn_implementation") == "flash_attention_2":
            kwargs["attn_implementation"] = "sdpa"
        return original.__func__(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def _patch_valuehead_loader() -> None:
    import verl.utils.model as model_utils

    original = model_utils.load_valuehead_model
    if getattr(original, "_m2po_cpu_patch", False):
        return

    @functools.wraps(original)
    def load_valuehead_model(*args, **kwargs):
        with _sdpa_instead_of_flash_attention():
            return original(*args, **kwargs)

    load_valuehead_model._m2po_cpu_patch = True
    model_utils.load_valuehead_model = load_valuehead_model


def _patch_sharded_snapshot() -> None:
    from verl.utils import fsdp_utils

    original = fsdp_utils.fsdp2_sharded_save_to_cpu
    if getattr(original, "_m2po_cpu_patch", False):
        return

    @functools.wraps(original)
    def fsdp2_sharded_save_to_cpu(model):
        state, spec = original(model)
        # a copy of each shard, not the parameter it aliases on CPU
        return {name: (tensor.clone(), shard_spec) for name, (tensor, shard_spec) in state.items()}, spec

    fsdp2_sharded_save_to_cpu._m2po_cpu_patch = True
    fsdp_utils.fsdp2_sharded_save_to_cpu = fsdp2_sharded_save_to_cpu


def _patch_replay_buffer_poll() -> None:
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    original = ReplayBuffer.__init__
    if getattr(original, "_m2po_cpu_patch", False):
        return

    interval = float(os.environ.get(POLL_INTERVAL_ENV, POLL_INTERVAL_S))
    if not interval > 0:
        raise ValueError(f"{POLL_INTERVAL_ENV} must be a number of seconds > 0, got {interval}")

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.poll_interval = interval

    __init__._m2po_cpu_patch = True
    ReplayBuffer.__init__ = __init__


class _DropMessage:
    """A logging filter that drops records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_per_request_warnings() -> None:
    import logging

    if os.environ.get(LOG_FILTER_ENV, "1") == "0":
        return
    wiring = logging.getLogger("verl.utils.tokenizer.continuous_token_wiring")
    if not any(isinstance(f, _DropMessage) for f in wiring.filters):
        wiring.addFilter(_DropMessage("No model-specific Continuous Token builder"))


def _cap_transfer_queue_threads() -> None:
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    os.environ.setdefault("TQ_NUM_THREADS", str(max(1, min(8, cores))))


def _register_engines() -> None:
    """verl's own FSDP engines, registered for device "cpu" through the public registry."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        for backend in ("fsdp", "fsdp2"):
            if "cpu" not in EngineRegistry._engines.get(model_type, {}).get(backend, {}):
                EngineRegistry.register(model_type=model_type, backend=backend, device="cpu")(engine)


def apply_patches() -> None:
    _patch_init_process_group()
    _patch_master_port_choice()
    _patch_offload_policy()
    _patch_valuehead_loader()
    _patch_sharded_snapshot()
    _patch_replay_buffer_poll()
    _quiet_per_request_warnings()
    _cap_transfer_queue_threads()
    _register_engines()
