"""A CPU backend for verl 0.9.1: run verl's real trainer (`python -m verl.trainer.main_ppo`) for a few
steps of any experiment on a laptop, with a tiny model.

Inert unless selected. It is switched on by verl's own platform selector, the environment variable
`VERL_PLATFORM=cpu`, which must be set before verl starts (verl picks its platform when
`verl.trainer.main_ppo` is imported, before hydra runs) and which Ray workers inherit. The hydra
overlay `+cpu=tiny` (configs/cpu/tiny.yaml) then sets the config values the backend needs and points
the run at a tiny model and dataset built offline. Without `VERL_PLATFORM=cpu`, importing this
package registers nothing here and changes nothing in verl (tested in a fresh process).

What activation does, in every process that imports verl (driver, TaskRunner, workers):
- registers `PlatformCPU` as verl platform "cpu" (device "cpu", gloo, no-op device shims, Ray
  scheduling on logical "GPU" slots that the overlay declares with `ray_init.num_gpus`);
- registers verl's own FSDP engines for device "cpu" (public `EngineRegistry.register`);
- registers the `hf` rollout: a batched HF-transformers sampling server behind verl's
  `RolloutReplica` / `BaseRollout` interfaces (`m2po.cpu_backend.rollout`);
- registers the `m2po_cpu` checkpoint engine (public `CheckpointEngineRegistry`), which syncs weights
  to standalone rollout replicas through Ray's object store (verl's `separate_async` trainer);
- applies the patches of verl private details listed in `m2po.cpu_backend.patches.PATCHES`, each
  pinned to `m2po.verl_integration.verl_internals.SUPPORTED_VERL_VERSION`.
"""

from __future__ import annotations

import os

SELECTOR_ENV = "VERL_PLATFORM"
SELECTOR_VALUE = "cpu"
ROLLOUT_NAME = "hf"

_activated = False


def is_selected() -> bool:
    return os.environ.get(SELECTOR_ENV, "").strip().lower() == SELECTOR_VALUE


def check_verl_version() -> None:
    import verl

    from m2po.verl_integration.verl_internals import SUPPORTED_VERL_VERSION

    if verl.__version__ != SUPPORTED_VERL_VERSION:
        raise RuntimeError(
            f"m2po's CPU backend (VERL_PLATFORM=cpu) patches private details of verl {SUPPORTED_VERL_VERSION} "
            f"and refuses verl {verl.__version__}: install verl=={SUPPORTED_VERL_VERSION} for CPU runs, or unset "
            f"VERL_PLATFORM to use verl's own platforms."
        )


def activate() -> None:
    """Register the CPU platform, engines and rollout, and apply the pinned patches (idempotent)."""
    global _activated
    if _activated:
        return
    # The platform goes in first: if the version check below fails, verl's plugin loader swallows
    # the error, but get_platform() then instantiates PlatformCPU, which raises it again, visibly.
    from m2po.cpu_backend.platform import register_platform

    register_platform()
    check_verl_version()

    from m2po.cpu_backend.checkpoint_engine import register_checkpoint_engine
    from m2po.cpu_backend.patches import apply_patches
    from m2po.cpu_backend.rollout import register_rollout

    apply_patches()
    register_rollout()
    register_checkpoint_engine()
    _activated = True


__all__ = ["ROLLOUT_NAME", "SELECTOR_ENV", "activate", "check_verl_version", "is_selected"]
