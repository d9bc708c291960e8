"""Forward + backward time of verl's vanilla PPO loss vs. M2PO (both variants) and no-trust-region.

Each loss is called exactly as verl's `ppo_loss` calls it (the registered function, with the actor
config and global batch info), on the same tensors; the timed region is the call plus
`loss.backward()` (metrics included: verl converts them to floats inside the call). Methods are
interleaved repeat by repeat so that machine noise hits all of them alike; the median is reported.

    python benchmarks/bench_policy_loss.py                      # CPU, 16k..1M tokens, both regimes
    python benchmarks/bench_policy_loss.py --device cuda        # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from tqdm import tqdm

import verl  # noqa: F401  (registers the m2po losses through the plugin entry point)
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from m2po.verl_integration.config import actor_config

METHODS = {  # label: (loss_mode, policy_loss config)
    "vanilla (GRPO eps=0.2)": ("vanilla", {}),
    "m2po mask": ("m2po", {"m2po_variant": "mask"}),
    "m2po clip": ("m2po", {"m2po_variant": "clip"}),
    "no_trust_region": ("no_trust_region", {}),
}


# How stale the data looks. "typical": the trust region's M2 sits at tau on its own, plus a 2% heavy
# tail that M2PO masks (about 0.6% of tokens). "stress": log-ratios N(0, 0.3**2), so M2 before
# masking is 0.09 (over twice tau) and half of the trust-region tokens lie above tau: the cut is
# deep inside the bulk, where a full sort of the candidates would dominate.
REGIMES = ("typical", "stress")


def make_batch(num_tokens: int, response_len: int, device: str, seed: int = 0, regime: str = "typical"):
    """Stale-looking log-probs `(batch, response_len)` of the given regime (see REGIMES) and
    GRPO-style per-sequence advantages."""
    g = torch.Generator().manual_seed(seed)
    batch = num_tokens // response_len
    shape = (batch, response_len)
    behaviour = -torch.rand(shape, generator=g) * 2
    if regime == "stress":
        log_ratio = 0.3 * torch.randn(shape, generator=g)
    else:
        log_ratio = 0.2 * torch.randn(shape, generator=g)  # trust-region M2 ~ 0.04 = tau on its own
        tail = torch.rand(shape, generator=g) < 0.02
        log_ratio = torch.where(tail, 1.0 * torch.randn(shape, generator=g), log_ratio)
    advantages = torch.randn(batch, 1, generator=g).expand(shape).contiguous()
    lengths = torch.randint(response_len // 2, response_len + 1, (batch,), generator=g)
    mask = torch.arange(response_len)[None, :] < lengths[:, None]
    to = dict(device=device)
    return (behaviour + log_ratio).to(**to), behaviour.to(**to), advantages.to(**to), mask.to(**to)


def time_methods(num_tokens, response_len, device, repeats, warmup, regime):
    log_probs, behaviour, advantages, mask = make_batch(num_tokens, response_len, device, regime=regime)
    calls = {}
    for label, (loss_mode, policy_loss) in METHODS.items():
        config = actor_config(loss_mode, **policy_loss)
        config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
        fn = get_policy_loss_fn(loss_mode)

        def call(fn=fn, config=config):
            lp = log_probs.detach().clone().requires_grad_()
            loss, _ = fn(
                old_log_prob=behaviour, log_prob=lp, advantages=advantages, response_mask=mask,
                loss_agg_mode="token-mean", config=config, rollout_is_weights=None,
            )
            loss.backward()

        calls[label] = call
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {label: [] for label in calls}
    for _ in range(repeats):
        for label, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            times[label].append(time.perf_counter() - start)
    # Masked fraction and M2 before masking on this data, for context.
    _, metrics = get_policy_loss_fn("m2po")(
        old_log_prob=behaviour, log_prob=log_probs, advantages=advantages, response_mask=mask,
        config=actor_config("m2po"),
    )
    return times, {key: metrics[f"actor/m2po/{key}"] for key in ("masked_fraction", "m2_before")}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536, 262144, 1048576],
                        help="padded tokens per call (batch x response_len)")
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES,
                        help="how stale the data looks (see REGIMES)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/policy_loss_<device>.json)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if any(size % args.response_len for size in args.sizes):
        parser.error(f"every --sizes value must be a multiple of --response-len ({args.response_len})")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for regime, size in tqdm([(r, n) for r in args.regimes for n in args.sizes], desc="regime x size", disable=None):
        times, data_stats = time_methods(size, args.response_len, args.device, args.repeats, args.warmup, regime)
        medians = {label: statistics.median(ts) * 1e3 for label, ts in times.items()}
        base = medians["vanilla (GRPO eps=0.2)"]
        rows.append({
            "regime": regime,
            "tokens": size,
            **data_stats,
            "median_ms": medians,
            "ratio_to_vanilla": {label: ms / base for label, ms in medians.items()},
        })

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    header = f"{'regime':>8} | {'tokens':>9} | {'M2 before':>9} | {'masked':>7} | " + " | ".join(
        f"{label:>24}" for label in METHODS
    )
    print(f"\nforward+backward, median of {args.repeats} (ms, and ratio to vanilla); "
          f"device={args.device} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = [f"{row['median_ms'][m]:9.2f} ms ({row['ratio_to_vanilla'][m]:4.2f}x)" for m in METHODS]
        print(f"{row['regime']:>8} | {row['tokens']:>9} | {row['m2_before']:9.4f} | {row['masked_fraction']:7.2%} | "
              + " | ".join(f"{c:>24}" for c in cells))

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"policy_loss_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({
            "device": args.device, "device_name": device_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "response_len": args.response_len,
            "rows": rows,
        }, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
