"""Start-up checks of a CPU run's config, and the OmegaConf resolvers the `cpu/tiny` overlay uses.

The overlay sets `trainer.device: ${m2po_cpu_device:}`. verl's `main_ppo` reads `trainer.device`
first thing in the driver (`auto_set_device`), so this check runs before Ray starts and every
unsupported combination fails there, by key, instead of hanging or failing deep in a worker.
"""

from __future__ import annotations

from omegaconf import OmegaConf

SUPPORTED_TRAINER_MODES = ("sync", "m2po_stale")
SUPPORTED_STRATEGIES = ("fsdp2",)


def _get(config, key: str, default=None):
    value = OmegaConf.select(config, key, default=default)
    return default if value is None else value


def cpu_config_errors(config) -> list[str]:
    """Everything in `config` the CPU backend cannot run, one message per key."""
    from m2po.cpu_backend import ROLLOUT_NAME, SELECTOR_ENV, is_selected

    errors = []
    if not is_selected():
        errors.append(
            f"the cpu overlay needs the CPU backend switched on before verl starts: set {SELECTOR_ENV}=cpu in the "
            f"environment (e.g. `{SELECTOR_ENV}=cpu python -m verl.trainer.main_ppo ... +cpu=tiny`)"
        )
    rollout = _get(config, "actor_rollout_ref.rollout.name")
    if rollout != ROLLOUT_NAME:
        errors.append(
            f"actor_rollout_ref.rollout.name={rollout!r} does not run on CPU (vLLM, SGLang and TensorRT-LLM need "
            f"GPUs); the CPU backend's rollout is {ROLLOUT_NAME!r}"
        )
    if _get(config, "trainer.nnodes", 1) != 1:
        errors.append(f"trainer.nnodes={_get(config, 'trainer.nnodes')}: the CPU backend runs on one machine (1 node)")
    if _get(config, "actor_rollout_ref.rollout.nnodes", 0) not in (0, 1):  # 0: the rollout shares the trainer's
        errors.append(
            f"actor_rollout_ref.rollout.nnodes={_get(config, 'actor_rollout_ref.rollout.nnodes')}: "
            "the CPU backend runs on one machine (1 node)"
        )
    for key in (
        "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "actor_rollout_ref.rollout.data_parallel_size",
        "actor_rollout_ref.rollout.pipeline_model_parallel_size",
    ):
        if _get(config, key, 1) != 1:
            errors.append(f"{key}={_get(config, key)}: the CPU rollout serves one process per replica; set it to 1")
    if _get(config, "actor_rollout_ref.model.lora_rank", 0) > 0:
        errors.append(
            "actor_rollout_ref.model.lora_rank > 0: LoRA weight sync to the rollout is not supported on CPU; use 0"
        )
    if _get(config, "trainer.use_v1", True):
        mode = _get(config, "trainer.v1.trainer_mode", "sync")
        if mode not in SUPPORTED_TRAINER_MODES:
            errors.append(
                f"trainer.v1.trainer_mode={mode!r}: asynchronous trainers are not supported on CPU; "
                f"supported: {', '.join(SUPPORTED_TRAINER_MODES)} (or trainer.use_v1=false, verl's v0 trainer)"
            )
    if not _get(config, "actor_rollout_ref.hybrid_engine", True):
        errors.append("actor_rollout_ref.hybrid_engine=false (standalone rollout) is not supported on CPU")
    for key in ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy", "critic.strategy"):
        strategy = _get(config, key)
        if strategy is not None and strategy not in SUPPORTED_STRATEGIES:
            errors.append(f"{key}={strategy!r}: on CPU only {', '.join(SUPPORTED_STRATEGIES)} works (FSDP1 needs a GPU)")
    attention_key = "actor_rollout_ref.model.override_config.attn_implementation"
    attention = _get(config, attention_key, "flash_attention_2")
    if attention not in ("sdpa", "eager"):
        errors.append(f"{attention_key}={attention!r}: flash attention needs a GPU; use sdpa")
    errors += _ray_capacity_errors(config)
    return errors


# verl reserves this many Ray CPUs per training worker (ResourcePoolManager's max_colocate_count).
CPUS_PER_TRAINING_WORKER = 3


def _ray_capacity_errors(config) -> list[str]:
    """Ray waits forever for resources it will never have (verl's placement groups have no
    timeout), so a cluster too small for the run is refused here, naming what is missing."""
    workers = _get(config, "trainer.n_gpus_per_node", 1)  # one node (checked above)
    slots = _get(config, "ray_kwargs.ray_init.num_gpus")
    errors = []
    if slots is not None and slots < workers:
        errors.append(
            f"ray_kwargs.ray_init.num_gpus={slots} logical slots for {workers} training workers "
            f"(trainer.n_gpus_per_node): Ray would wait for them forever"
        )
    cpus = _get(config, "ray_kwargs.ray_init.num_cpus")
    storage_units = _get(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", 1)
    # training workers' placement groups + TransferQueue's controller and storage units + the TaskRunner
    needed = CPUS_PER_TRAINING_WORKER * workers + 1 + storage_units + 1
    if cpus is not None and cpus < needed:
        errors.append(
            f"ray_kwargs.ray_init.num_cpus={cpus} is too few logical CPUs for Ray to place this run "
            f"(needs at least {needed}: {CPUS_PER_TRAINING_WORKER} per training worker, TransferQueue's controller "
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


def _tiny_resolver(name: str):
    from m2po.cpu_backend.tiny import artifact_path

    return artifact_path(name)


def register_resolvers() -> None:
    """Idempotent; cheap (nothing is imported or built until a resolver is used)."""
    if not OmegaConf.has_resolver("m2po_cpu_device"):
        OmegaConf.register_new_resolver("m2po_cpu_device", _device_resolver)
    if not OmegaConf.has_resolver("m2po_cpu_tiny"):
        OmegaConf.register_new_resolver("m2po_cpu_tiny", _tiny_resolver)
