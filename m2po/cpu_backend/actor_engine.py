"""verl's FSDP actor engine in this process, without Ray or the trainer: what verl's actor worker builds
(`EngineRegistry.new` + `initialize`) and the mini-batch it hands to `forward_backward_batch`.

For the tests and benchmarks that exercise verl's own training pass directly (the mini-batch scope's
invariance test, its cost benchmark). Needs the CPU backend active (`VERL_PLATFORM=cpu` before verl is
imported) and `torch.distributed` initialised (gloo), one process per data-parallel rank.
"""

from __future__ import annotations

import torch


def build_actor_engine(model_path: str, *, gradient_checkpointing: bool = False, float32: bool = True, lr: float = 1e-3):
    """verl's `FSDPEngineWithLMHead` (strategy fsdp2) over the HF model at `model_path`, initialised.
    `float32`: compute in float32 (no bf16 autocast), so results can be compared tightly."""
    from verl.trainer.config.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine import EngineRegistry

    model_config = HFModelConfig(path=model_path, override_config={"attn_implementation": "sdpa"},
                                 enable_gradient_checkpointing=gradient_checkpointing)
    engine_config = FSDPEngineConfig(strategy="fsdp2", mixed_precision={"param_dtype": "fp32"} if float32 else None)
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=engine_config, optimizer_config=FSDPOptimizerConfig(lr=lr),
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine, model_config


def mini_batch(padded: dict[str, torch.Tensor], *, global_batch_size: int, use_dynamic_bsz: bool,
               max_token_len_per_gpu: int | None = None, micro_batch_size_per_gpu: int | None = None):
    """One rank's mini-batch as `forward_backward_batch` takes it: verl's padded layout (`prompts`,
    `responses`, `input_ids`, `attention_mask`, `position_ids`, `response_mask`, and the loss's fields)
    converted by verl's `left_right_2_no_padding`, with the micro-batching given."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    rows = len(padded["prompts"])
    td = left_right_2_no_padding(TensorDict(dict(padded), batch_size=[rows]))
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False, global_batch_size=global_batch_size,
                         use_remove_padding=True, use_fused_kernels=False, use_dynamic_bsz=use_dynamic_bsz,
                         max_token_len_per_gpu=max_token_len_per_gpu or 1 << 20,
                         micro_batch_size_per_gpu=micro_batch_size_per_gpu or rows)
    return td

