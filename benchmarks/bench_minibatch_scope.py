"""What `policy_loss.m2_scope=mini_batch` costs in verl's FSDP actor: the forward without gradient it adds
per optimizer mini-batch, against verl's training pass over the same mini-batch, on CPU.

verl's real `FSDPEngine.forward_backward_batch` with verl's `ppo_loss` and the M2PO loss (one process,
float32, the CPU backend), on one mini-batch of a small Llama (default 4 layers, hidden 512, GQA) built
here; with and without gradient checkpointing (the paper's scripts turn it on). Timed, interleaved
repeat by repeat, median reported:
- `forward`: verl's forward without gradient over the mini-batch (what the mini-batch scope adds);
- `train micro_batch`: the training pass (forward + backward of every micro-batch) with the cut per micro-batch;
- `train mini_batch`: the same with the cut over the mini-batch (its forward and decision included).
The extra cost is `train mini_batch - train micro_batch`, shown as a share of the training pass; the
forward's share of a forward + backward is the number that carries over to other models and hardware
(docs/benchmarks.md turns it into an estimate for the 7B s256 run on 8xH100).

    VERL_PLATFORM=cpu python benchmarks/bench_minibatch_scope.py            # ~5 min on 2 cores
    VERL_PLATFORM=cpu python benchmarks/bench_minibatch_scope.py --repeats 1 --sequences 4   # a quick look

Prints a table, writes JSON (benchmarks/results/minibatch_scope.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial

os.environ.setdefault("VERL_PLATFORM", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402


def build_model_dir(directory: str, layers: int, hidden: int, seed: int = 0) -> str:
    """A Llama of the tiny model's vocabulary with `layers` x `hidden` (intermediate 2.75x, 8 heads, 2 KV heads)."""
    from m2po.cpu_backend import tiny
    from m2po.utils.tiny_llama import tiny_llama

    model = tiny_llama(seed, vocab_size=len(tiny.SYMBOLS), hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                       num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                       max_position_embeddings=4096, bos_token_id=None, torch_dtype="float32")
    model.save_pretrained(directory, safe_serialization=True)
    tiny.build_tokenizer().save_pretrained(directory)
    return directory


def padded_batch(sequences: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0) -> dict:
    """Full-length prompts and responses (the token count fixes the cost); stale-looking old log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, vocab, (sequences, prompt_len), generator=g)
    responses = torch.randint(3, vocab, (sequences, response_len), generator=g)
    attention_mask = torch.ones(sequences, prompt_len + response_len, dtype=torch.long)
    return {
        "prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": attention_mask, "position_ids": attention_mask.cumsum(1) - 1,
        "response_mask": torch.ones(sequences, response_len, dtype=torch.long),
        "old_log_probs": -torch.log(torch.tensor(float(vocab))) + 0.3 * torch.randn(sequences, response_len, generator=g),
        "advantages": torch.randn(sequences, 1, generator=g).expand(sequences, response_len).clone(),
    }


def measure(args, checkpointing: bool, model_dir: str) -> dict:
    from verl.workers.utils.losses import ppo_loss

    from m2po.cpu_backend.actor_engine import build_actor_engine, mini_batch
    from m2po.verl_integration.config import actor_config
    from m2po.verl_integration.minibatch_scope import current_log_probs

    engine, model_config = build_actor_engine(model_dir, gradient_checkpointing=checkpointing)
    batch = padded_batch(args.sequences, args.prompt_len, args.response_len, model_config.hf_config.vocab_size)

    def td():
        return mini_batch(batch, global_batch_size=args.sequences, use_dynamic_bsz=False,
                          micro_batch_size_per_gpu=args.micro_batch)

    def train(scope):
        config = actor_config("m2po", mini_batch_size=args.sequences, m2_scope=scope)
        engine.optimizer_zero_grad()
        engine.forward_backward_batch(td(), loss_function=partial(ppo_loss, config=config))

    timed = {"forward": lambda: current_log_probs(engine, td()),
             "train micro_batch": lambda: train("micro_batch"),
             "train mini_batch": lambda: train("mini_batch")}
    seconds = {name: [] for name in timed}
    with engine.train_mode():
        for fn in timed.values():  # warm-up
            fn()
        for _ in tqdm(range(args.repeats), desc=f"checkpointing={checkpointing}", leave=False):
            for name, fn in timed.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    extra = median["train mini_batch"] - median["train micro_batch"]
    return {"gradient_checkpointing": checkpointing, "seconds": median, "all_seconds": seconds,
            "extra_s": extra, "extra_share_of_training_pass": extra / median["train micro_batch"],
            "forward_share_of_training_pass": median["forward"] / median["train micro_batch"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=16, help="sequences in the mini-batch")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "minibatch_scope.json"))
    args = parser.parse_args(argv)
    if args.sequences % args.micro_batch:
        parser.error("--micro-batch must divide --sequences")
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        model_dir = build_model_dir(os.path.join(tmp, "model"), args.layers, args.hidden)
        rows = [measure(args, checkpointing, model_dir) for checkpointing in (False, True)]
        dist.destroy_process_group()
    tokens = args.sequences * (args.prompt_len + args.response_len)
    print(f"\nverl FSDP actor on CPU ({os.cpu_count()} cores), Llama {args.layers} x {args.hidden}, mini-batch "
          f"{args.sequences} x {args.prompt_len + args.response_len} tokens ({tokens}), micro-batches of {args.micro_batch}; "
          f"median of {args.repeats}\n")
    print("| gradient checkpointing | forward (no grad) | train, micro_batch scope | train, mini_batch scope | "
          "extra | extra / training pass | forward / training pass |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["seconds"]
        print(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {s['forward']:.2f} s | {s['train micro_batch']:.2f} s | "
              f"{s['train mini_batch']:.2f} s | {r['extra_s']:.2f} s | {100 * r['extra_share_of_training_pass']:.1f}% | "
              f"{100 * r['forward_share_of_training_pass']:.1f}% |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "tokens": tokens, "machine": platform.platform(), "cores": os.cpu_count(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
