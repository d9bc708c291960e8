"""Start-up checks of a CPU run's config, and the OmegaConf resolvers the `cpu/tiny` overlay uses.

The overlay sets `trainer.device: ${m2po_cpu_device:}`. verl's `main_ppo` reads `trainer.device`
first thing in the driver (`auto_set_device`), so this check runs before Ray starts and every
unsupported combination fails there, by key, instead of hanging or failing deep in a worker.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from m2po.utils.config_values import config_value

SUPPORTED_STRATEGIES = ("fsdp2",)


def _trainer_modes(config) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """(configured mode, modes supported on CPU, separate-async modes). Imported on use: this module
    is loaded while `import verl` loads its plugins, when the verl integration cannot be imported yet."""
    from m2po.verl_integration.trainer_modes import ASYNC_MODES, SEPARATE_ASYNC_MODES, SYNC_MODES, trainer_mode

    return trainer_mode(config), (*SYNC_MODES, *ASYNC_MODES, "v0"), SEPARATE_ASYNC_MODES



def cpu_config_errors(config) -> list[str]:
    """Everything in `config` the CPU backend cannot run, one message per key."""
    from m2po.cpu_backend import ROLLOUT_NAME, SELECTOR_ENV, is_selected

    errors = []
    if not is_selected():
        errors.append(
            f"the cpu overlay needs the CPU backend switched on before verl starts: set {SELECTOR_ENV}=cpu in the "
            f"environment (e.g. `{SELECTOR_ENV}=cpu python -m verl.trainer.main_ppo ... +cpu=tiny`)"
        )
    rollout = config_value(config, "actor_rollout_ref.rollout.name")
    if rollout != ROLLOUT_NAME:
        errors.append(
            f"actor_rollout_ref.rollout.name={rollout!r} does not run on CPU (vLLM, SGLang and TensorRT-LLM need "
            f"GPUs); the CPU backend's rollout is {ROLLOUT_NAME!r}"
        )
    if config_value(config, "trainer.nnodes", 1) != 1:
        errors.append(f"trainer.nnodes={config_value(config, 'trainer.nnodes')}: the CPU backend runs on one machine (1 node)")
    if config_value(config, "actor_rollout_ref.rollout.nnodes", 0) not in (0, 1):  # 0: the rollout shares the trainer's
        errors.append(
            f"actor_rollout_ref.rollout.nnodes={config_value(config, 'actor_rollout_ref.rollout.nnodes')}: "
            "the CPU backend runs on one machine (1 node)"
        )
    for key in (
        "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "actor_rollout_ref.rollout.data_parallel_size",
        "actor_rollout_ref.rollout.pipeline_model_parallel_size",
    ):
        if config_value(config, key, 1) != 1:
            errors.append(f"{key}={config_value(config, key)}: the CPU rollout serves one process per replica; set it to 1")
    if config_value(config, "actor_rollout_ref.model.lora_rank", 0) > 0:
        errors.append(
            "actor_rollout_ref.model.lora_rank > 0: LoRA weight sync to the rollout is not supported on CPU; use 0"
        )
    mode, supported_modes, separate_async_modes = _trainer_modes(config)
    if mode not in supported_modes:
        errors.append(
            f"trainer.v1.trainer_mode={mode!r} is not supported on CPU; supported: "
            f"{', '.join(supported_modes[:-1])} (or trainer.use_v1=false, verl's v0 trainer)"
        )
    hybrid = config_value(config, "actor_rollout_ref.hybrid_engine", True)
    if mode in separate_async_modes:
        errors += _standalone_rollout_errors(config, mode, hybrid)
    elif not hybrid:
        errors.append(
            f"actor_rollout_ref.hybrid_engine=false (standalone rollout) needs trainer.v1.trainer_mode in "
            f"{list(separate_async_modes)} on CPU, got {mode!r}"
        )
    for key in ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy", "critic.strategy"):
        strategy = config_value(config, key)
        if strategy is not None and strategy not in SUPPORTED_STRATEGIES:
            errors.append(f"{key}={strategy!r}: on CPU only {', '.join(SUPPORTED_STRATEGIES)} works (FSDP1 needs a GPU)")
    attention_key = "actor_rollout_ref.model.override_config.attn_implementation"
    attention = config_value(config, attention_key, "flash_attention_2")
    if attention not in ("sdpa", "eager"):
        errors.append(f"{attention_key}={attention!r}: flash attention needs a GPU; use sdpa")
    errors += _ray_capacity_errors(config)
    return errors


def _standalone_rollout_errors(config, mode: str, hybrid: bool) -> list[str]:
    """verl's separate_async on CPU: the rollout is served by standalone `hf` replicas only, synced
    through the object-store checkpoint engine."""
    from m2po.cpu_backend.checkpoint_engine import BACKEND

    errors = []
    if hybrid:
        errors.append(
            f"actor_rollout_ref.hybrid_engine=true with trainer.v1.trainer_mode={mode}: on CPU the standalone "
            "replicas serve every rollout; set actor_rollout_ref.hybrid_engine=false"
        )
    backend_key = "actor_rollout_ref.rollout.checkpoint_engine.backend"
    backend = config_value(config, backend_key, "naive")
    if backend != BACKEND:
        errors.append(
            f"{backend_key}={backend!r}: NCCL, NIXL and the other GPU engines do not run on CPU; the CPU backend "
            f"syncs standalone replicas with {BACKEND!r}"
        )
    if config_value(config, "actor_rollout_ref.rollout.n_gpus_per_node", 0) < 1:
        errors.append(
            "actor_rollout_ref.rollout.n_gpus_per_node must be >= 1 with a standalone rollout "
            "(one `hf` replica per logical slot)"
        )
    return errors


# verl reserves this many Ray CPUs per training worker (ResourcePoolManager's max_colocate_count), and
# this many per standalone rollout slot (RolloutReplica.init_standalone).
CPUS_PER_TRAINING_WORKER = 3
CPUS_PER_STANDALONE_ROLLOUT_SLOT = 2


def standalone_rollout_slots(config) -> int:
    """Logical "GPU" slots of verl's standalone rollout pool (0 unless a separate_async trainer)."""
    mode, _, separate_async_modes = _trainer_modes(config)
    if mode not in separate_async_modes:
        return 0
    return config_value(config, "actor_rollout_ref.rollout.nnodes", 1) * config_value(config, "actor_rollout_ref.rollout.n_gpus_per_node", 1)


def _ray_capacity_errors(config) -> list[str]:
    """Ray waits forever for resources it will never have (verl's placement groups have no
    timeout), so a cluster too small for the run is refused here, naming what is missing."""
    workers = config_value(config, "trainer.n_gpus_per_node", 1)  # one node (checked above)
    rollout_slots = standalone_rollout_slots(config)
    slots = config_value(config, "ray_kwargs.ray_init.num_gpus")
    errors = []
    if slots is not None and slots < workers + rollout_slots:
        errors.append(
            f"ray_kwargs.ray_init.num_gpus={slots} logical slots for {workers} training workers "
            f"(trainer.n_gpus_per_node) and {rollout_slots} standalone rollout slots: Ray would wait for them forever"
        )
    cpus = config_value(config, "ray_kwargs.ray_init.num_cpus")
    storage_units = config_value(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", 1)
    # placement groups + TransferQueue's controller and storage units + the TaskRunner
    needed = CPUS_PER_TRAINING_WORKER * workers + CPUS_PER_STANDALONE_ROLLOUT_SLOT * rollout_slots
    needed += 1 + storage_units + 1
    if cpus is not None and cpus < needed:
        errors.append(
            f"ray_kwargs.ray_init.num_cpus={cpus} is too few logical CPUs for Ray to place this run "
            f"(needs at least {needed}: {CPUS_PER_TRAINING_WORKER} per training worker, "
            f"{CPUS_PER_STANDALONE_ROLLOUT_SLOT} per standalone rollout slot, TransferQueue's controller "
            f"and {storage_units} storage unit(s), the TaskRunner); logical CPUs may exceed physical cores"
        )
    return errors


def check_cpu_config(config) -> None:
    errors = cpu_config_errors(config)
    if errors:
        raise ValueError("CPU backend: " + "; ".join(errors))


def _device_resolver(*, _root_):
    check_cpu_config(_root_)
    return "cpu"


def _slots_resolver(*, _root_):
    """Logical "GPU" slots the overlay declares to Ray: the training workers plus, for verl's
    separate_async trainer, the standalone rollout pool."""
    return config_value(_root_, "trainer.n_gpus_per_node", 1) + standalone_rollout_slots(_root_)


def _tiny_resolver(name: str):
    from m2po.cpu_backend.tiny import artifact_path

    return artifact_path(name)


def register_resolvers() -> None:
    """Idempotent; cheap (nothing is imported or built until a resolver is used)."""
    if not OmegaConf.has_resolver("m2po_cpu_device"):
        OmegaConf.register_new_resolver("m2po_cpu_device", _device_resolver)
    if not OmegaConf.has_resolver("m2po_cpu_slots"):
        OmegaConf.register_new_resolver("m2po_cpu_slots", _slots_resolver)
    if not OmegaConf.has_resolver("m2po_cpu_tiny"):
        OmegaConf.register_new_resolver("m2po_cpu_tiny", _tiny_resolver)

