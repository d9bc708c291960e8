"""verl platform "cpu": device "cpu", collectives over gloo, device calls verl makes turned into no-ops.

Imported only when the backend is activated (`m2po.cpu_backend.activate`, inside `import verl`).

Ray scheduling: verl places every worker on its platform's Ray resource and checks the cluster's
"GPU" (or "NPU") count before starting. On CPU the overlay starts Ray with as many *logical* "GPU"
slots as training workers (`ray_kwargs.ray_init.num_gpus`), so verl's scheduling, placement groups
and resource check work unchanged; no process ever touches CUDA.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Optional

import torch
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

PLATFORM_NAME = "cpu"


def _noop(*_args, **_kwargs):
    return None


def _build_device_module() -> types.ModuleType:
    """`torch.cpu` plus the `torch.cuda`-style calls verl makes on its device module."""
    module = types.ModuleType("m2po_cpu_device")
    for name in dir(torch.cpu):
        if not name.startswith("_"):
            setattr(module, name, getattr(torch.cpu, name))
    module.is_available = lambda: True
    module.device_count = lambda: 1
    # verl passes the current device straight to `.to(...)`; an index would mean an accelerator.
    module.current_device = lambda: "cpu"
    module.set_device = _noop
    module.synchronize = _noop
    module.empty_cache = _noop
    module.ipc_collect = _noop
    module.set_per_process_memory_fraction = _noop
    module.reset_peak_memory_stats = _noop
    module.manual_seed = torch.manual_seed
    module.manual_seed_all = torch.manual_seed
    module.get_rng_state = lambda *_a, **_k: torch.get_rng_state()
    module.set_rng_state = lambda state, *_a, **_k: torch.set_rng_state(state)
    module.get_device_name = lambda *_a, **_k: "cpu"
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(module, name, lambda *_a, **_k: 0)

    def mem_get_info(*_args, **_kwargs):
        import psutil

        memory = psutil.virtual_memory()
        return memory.available, memory.total

    module.mem_get_info = mem_get_info
    return module


_DEVICE_MODULE = _build_device_module()


class PlatformCPU(PlatformBase):
    """verl platform "cpu" (see the module docstring); selected only by VERL_PLATFORM=cpu."""

    def __init__(self):
        from m2po.cpu_backend import check_verl_version

        check_verl_version()

    device_name = property(lambda self: "cpu")
    vendor_name = property(lambda self: "cpu")
    device_module = property(lambda self: _DEVICE_MODULE)

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: only VERL_PLATFORM=cpu selects it.
        return False

    def current_device(self) -> str:
        return "cpu"  # verl passes this to `.to(...)`, where an index would mean an accelerator

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register_platform() -> type[PlatformCPU]:
    """Register `PlatformCPU` as verl platform "cpu" (idempotent)."""
    if PlatformRegistry.get(PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformRegistry.get(PLATFORM_NAME)
