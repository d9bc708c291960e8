"""One mini-batch through verl's real FSDP actor engine on CPU, on 1 or 2 gloo ranks, under several
micro-batchings and M2PO settings; rank 0 writes what each setting decided and the gradient it gave.

Run by tests/test_minibatch_scope.py in a fresh process (the CPU platform must be selected before
verl is imported):

    VERL_PLATFORM=cpu python -m tests.minibatch_scope_worker --world 2 --out DIR

Per setting it writes DIR/<world>-<setting>.safetensors with the mini-batch's keep-mask `(batch,
response_len)` as decided (absent for the micro-batch scope and the clip variant), the clip cap, the
full gradient of every parameter (flattened, in parameter order) after one forward_backward_batch, and
the log-probs at the weights trained from verl's forward micro-batched as that setting's (what the cut is
decided on); once, DIR/<world>-inputs.safetensors: the same log-probs from one forward over each rank's
whole share, old log-probs, advantages, response mask and rollout weights of the whole batch.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BATCH, PROMPT_LEN, RESPONSE_LEN = 8, 6, 10
TAU = 0.04
# (name, use_dynamic_bsz, max_token_len_per_gpu, micro_batch_size_per_gpu, m2po_variant, m2_scope)
SETTINGS = (
    ("dynamic-40", True, 40, None, "mask", "mini_batch"),
    ("dynamic-16", True, 16, None, "mask", "mini_batch"),
    ("micro-1", False, None, 1, "mask", "mini_batch"),
    ("micro-all", False, None, "all", "mask", "mini_batch"),
    ("clip-dynamic-16", True, 16, None, "clip", "mini_batch"),
    ("clip-micro-all", False, None, "all", "clip", "mini_batch"),
    ("decoupled-micro-1", False, None, 1, "decoupled", "mini_batch"),
    ("decoupled-micro-all", False, None, "all", "decoupled", "mini_batch"),
    ("per-micro-1", False, None, 1, "mask", "micro_batch"),
)


def batch(vocab: int) -> dict[str, torch.Tensor]:
    """The whole mini-batch, left-padded prompts and right-padded responses (verl's padded layout).
    Old log-probs sit near the untrained model's uniform log-prob with noise, so the mask has work."""
    g = torch.Generator().manual_seed(0)
    prompt_lens = torch.randint(2, PROMPT_LEN + 1, (BATCH,), generator=g)
    response_lens = torch.randint(1, RESPONSE_LEN + 1, (BATCH,), generator=g)
    prompts = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    responses = torch.zeros(BATCH, RESPONSE_LEN, dtype=torch.long)
    prompt_mask = torch.zeros(BATCH, PROMPT_LEN, dtype=torch.long)
    response_mask = torch.zeros(BATCH, RESPONSE_LEN, dtype=torch.long)
    for i in range(BATCH):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        prompts[i, PROMPT_LEN - p :] = torch.randint(3, vocab, (p,), generator=g)
        prompt_mask[i, PROMPT_LEN - p :] = 1
        responses[i, :r] = torch.randint(3, vocab, (r,), generator=g)
        response_mask[i, :r] = 1
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    uniform = -torch.log(torch.tensor(float(vocab)))
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "response_mask": response_mask,
        "old_log_probs": uniform + 0.3 * torch.randn(BATCH, RESPONSE_LEN, generator=g),
        "advantages": torch.randn(BATCH, 1, generator=g).expand(BATCH, RESPONSE_LEN).clone(),
        "rollout_is_weights": (0.25 * torch.randn(BATCH, RESPONSE_LEN, generator=g)).exp(),
    }


def _rank_rows(tensors: dict, rank: int, world: int) -> dict:
    """verl's dispatch: rank r gets the r-th contiguous share of the batch."""
    share = BATCH // world
    return {name: t[rank * share : (rank + 1) * share] for name, t in tensors.items()}


def _gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _full_gradient(engine) -> torch.Tensor:
    grads = []
    for p in engine.module.parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        grads.append(g.reshape(-1).float())
    return torch.cat(grads)


def _main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from safetensors.torch import save_file
    from verl.workers.utils.losses import ppo_loss

    from m2po.cpu_backend import tiny
    from m2po.cpu_backend.actor_engine import build_actor_engine, mini_batch
    from m2po.verl_integration.config import actor_config
    from m2po.verl_integration.minibatch_scope import CAP_FIELD, KEEP_FIELD, STATS_FIELD, current_log_probs

    # float32 compute, so that "the same gradient up to float summation order" can be checked tightly
    engine, model_config = build_actor_engine(os.path.join(tiny.ensure_built(), "model"))
    full = batch(model_config.hf_config.vocab_size)

    def rank_mini_batch(dynamic: bool, max_tokens, micro):
        share = BATCH // world
        return mini_batch(_rank_rows(full, rank, world), global_batch_size=BATCH, use_dynamic_bsz=dynamic,
                          max_token_len_per_gpu=max_tokens, micro_batch_size_per_gpu=share if micro == "all" else micro)

    def gathered_log_probs(td):
        return _gather_rows(current_log_probs(engine, td).float(), world)

    with engine.train_mode():
        inputs = {name: full[name].float() for name in ("old_log_probs", "advantages", "response_mask", "rollout_is_weights")}
        inputs["log_probs"] = gathered_log_probs(rank_mini_batch(False, None, "all"))
        if rank == 0:
            save_file(inputs, os.path.join(out_dir, f"{world}-inputs.safetensors"))
        for name, dynamic, max_tokens, micro, variant, scope in SETTINGS:
            td = rank_mini_batch(dynamic, max_tokens, micro)
            result = {"log_probs": gathered_log_probs(td)}  # what the cut is decided on, as the hook computes it
            engine.optimizer_zero_grad()
            output = engine.forward_backward_batch(td, loss_function=partial(
                ppo_loss, config=actor_config("m2po", mini_batch_size=BATCH, m2_threshold=TAU, m2po_variant=variant,
                                                   m2_scope=scope)))
            result["gradient"] = _full_gradient(engine)
            differ = output["metrics"].get("actor/m2po/micro_scope_differ_fraction")
            if differ is not None:  # one value per micro-batch, in micro-batch order
                values = differ.values if hasattr(differ, "values") else [v for m in differ for v in m.values]
                result["micro_scope_differ"] = _gather_rows(torch.tensor(values).double(), world)
            if KEEP_FIELD in td.keys():
                result["keep_mask"] = _gather_rows(td[KEEP_FIELD].to(torch.uint8), world)
                result["minibatch_stats"] = _gather_rows(td[STATS_FIELD].double(), world)
            if CAP_FIELD in td.keys():
                result["log_ratio_cap"] = _gather_rows(td[CAP_FIELD].double(), world)
            if rank == 0:
                save_file(result, os.path.join(out_dir, f"{world}-{name}.safetensors"))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, choices=(1, 2), required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    init_file = os.path.join(args.out, f"init-{args.world}")
    if os.path.exists(init_file):
        os.remove(init_file)
    mp.spawn(_main, args=(args.world, init_file, args.out), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
