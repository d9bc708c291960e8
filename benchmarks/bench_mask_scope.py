"""How much M2PO's mask depends on its scope: per micro-batch (what verl's per-micro-batch loss call
gives today) against the whole optimizer mini-batch (the paper's Algorithm 1), on real stale batches.

Trains one stale M2PO run of the main job (copy_add, the default settings: s = 64 updates, lr 5e-5,
clipping 1.0, 32 sequences per mini-batch) and, at every update, takes the mask of the mini-batch it is
about to train on at the current weights in both scopes, for micro-batches of 1, 2, 4, 8 and 16
sequences (a rank's micro-batch; the mini-batch scope is also what 32 / k data-parallel ranks with one
micro-batch each would need to agree on). Training itself uses the package's M2PO loss as usual.

    python benchmarks/bench_mask_scope.py                   # 150 iterations (600 updates), ~2 min + SFT
    python benchmarks/bench_mask_scope.py --iterations 40   # a quick look

Per micro-batch size, over the updates after the warm-up (staleness = s): tokens masked differently
from the mini-batch mask (% of valid tokens), masked fractions of both scopes, and M2 over the trust
region after masking inside each micro-batch (mean and largest), for either scope's mask. Prints a table,
writes JSON (benchmarks/results/mask_scope.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import numpy as np
import torch
from tqdm import tqdm
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from m2po.algorithm import second_moment_keep_mask, trust_region_mask
from m2po.algorithm.minibatch_mask import minibatch_keep_masks
from m2po.buffer import PolicyVersion, StaleRolloutBuffer
from m2po.testbed.config import preset
from m2po.testbed.rl import generate_batch, testbed_actor_config, train_on
from m2po.testbed.sft import base_policy, load_base

MICRO_BATCH_SEQUENCES = (1, 2, 4, 8, 16)


def _m2_after(log_ratio, trust_region, keep) -> float:
    """Mean (log r)^2 over the kept trust-region tokens (0 when none)."""
    kept = trust_region & keep
    return float(log_ratio[kept].double().square().sum() / kept.sum().clamp(min=1))


def compare_scopes(log_ratio, trust_region, valid, tau: float, sequences: int) -> dict[str, float]:
    """Per-micro-batch masks (`sequences` rows each) against the mini-batch mask of `(batch, len)` inputs."""
    whole = minibatch_keep_masks([log_ratio], [trust_region], tau)[0]
    parts = zip(log_ratio.split(sequences), trust_region.split(sequences), whole.split(sequences))
    per_micro, m2_per_micro_scope, m2_whole_scope = [], [], []
    for d, tr, whole_part in parts:
        keep = second_moment_keep_mask(d, tr, tau)
        per_micro.append(keep)
        m2_per_micro_scope.append(_m2_after(d, tr, keep))
        m2_whole_scope.append(_m2_after(d, tr, whole_part))
    per_micro = torch.cat(per_micro)
    tokens = valid.sum().clamp(min=1)
    return {
        "differ": float(((per_micro != whole) & valid).sum() / tokens),
        "masked_micro": float((~per_micro & valid).sum() / tokens),
        "masked_minibatch": float((~whole & valid).sum() / tokens),
        "m2_after_micro_mean": float(np.mean(m2_per_micro_scope)),
        "m2_after_micro_max": float(np.max(m2_per_micro_scope)),
        "m2_after_minibatch_scope_per_micro_mean": float(np.mean(m2_whole_scope)),
        "m2_after_minibatch_scope_per_micro_max": float(np.max(m2_whole_scope)),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="outputs/testbed/cache", help="the main job's base-policy cache")
    parser.add_argument("--out", default="benchmarks/results/mask_scope.json")
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    config = preset("default")
    config = dataclasses.replace(config, rl=dataclasses.replace(config.rl, iterations=args.iterations))
    rl = config.rl
    torch.set_num_threads(1)
    model, _ = load_base(base_policy(config, args.cache))
    optimizer = torch.optim.AdamW(model.parameters(), lr=rl.lr, betas=(0.9, 0.999), weight_decay=0.01)
    generator = torch.Generator().manual_seed(1_000_003 * (args.seed + 1))
    buffer = StaleRolloutBuffer(rl.staleness(stale=True), required_fields=("old_log_probs",))
    loss_fn, actor = get_policy_loss_fn("m2po"), testbed_actor_config(config, "m2po")
    rows: dict[int, list[dict]] = {k: [] for k in MICRO_BATCH_SEQUENCES}
    state = {"staleness": 0}

    def observe(mini, log_probs):
        if state["staleness"] < rl.staleness_updates:
            return  # the warm-up's fresher batches: not the stale regime being measured
        valid = mini["response_mask"]
        log_ratio = torch.where(valid, log_probs - mini["old_log_probs"], 0.0)
        trust_region = trust_region_mask(log_ratio, mini["advantages"], valid)
        for sequences in MICRO_BATCH_SEQUENCES:
            rows[sequences].append(compare_scopes(log_ratio, trust_region, valid, rl.m2_threshold, sequences))

    updates = 0
    for iteration in tqdm(range(rl.iterations), desc="stale M2PO"):
        version = PolicyVersion(global_step=iteration, updates=updates)
        model.eval()
        for _ in range(buffer.warmup_batches_needed()):
            buffer.push(generate_batch(model, config, generator), version)
        buffer.push(generate_batch(model, config, generator), version)
        item = buffer.pop_ready(version)
        if item is not None:
            state["staleness"] = item.staleness_updates
            model.train()
            train_on(model, optimizer, item.batch, config, loss_fn, actor, observer=observe)
            updates += rl.mini_batches

    mini_batch = rl.prompts_per_iteration * rl.samples_per_prompt // rl.mini_batches
    summary = {k: {key: float(np.mean([r[key] for r in v])) for key in v[0]} | {"updates": len(v)}
               for k, v in rows.items() if v}
    print(f"Mask scope on copy_add stale M2PO batches (s = {rl.staleness_updates}, mini-batch of {mini_batch} "
          f"sequences, tau {rl.m2_threshold}), means over {len(rows[1])} updates:")
    print("| micro-batch (sequences) | tokens masked differently | masked: per micro / mini-batch scope | "
          "M2 after, per micro-batch scope: mean / max | M2 after, mini-batch scope, per micro-batch: mean / max |")
    print("|---|---|---|---|---|")
    for k, s in summary.items():
        print(f"| {k} | {s['differ']:.3%} | {s['masked_micro']:.3%} / {s['masked_minibatch']:.3%} | "
              f"{s['m2_after_micro_mean']:.4f} / {s['m2_after_micro_max']:.4f} | "
              f"{s['m2_after_minibatch_scope_per_micro_mean']:.4f} / {s['m2_after_minibatch_scope_per_micro_max']:.4f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"iterations": rl.iterations, "seed": args.seed, "mini_batch_sequences": mini_batch,
                   "staleness_updates": rl.staleness_updates, "m2_threshold": rl.m2_threshold,
                   "machine": platform.processor() or platform.machine(), "per_micro_batch_size": summary}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
