"""Where a step of verl's trainer goes on CPU, and what the CPU backend removed from it.

One short on-policy GRPO run of the main job's experiment (`python -m m2po.testbed --engine verl`:
16 prompts x 8 samples of 20 tokens, 4 updates per step, the testbed's 330k-parameter policy) through
verl's real `main_ppo` per variant, run one at a time:

- `verl defaults`: what verl 0.9.1 does unpatched: the v1 replay buffer polls every 2 s, TransferQueue
  asks for 8 threads (and warns on every put and get on a machine with fewer physical cores) and
  the agent loop warns on every request that a llama model has no model-specific token builder;
- `cpu backend`: the CPU backend as shipped (poll 0.05 s, TQ_NUM_THREADS = physical cores, that
  warning filtered).

Reports the mean over the steps after the first (the first carries one-off warm-ups) of verl's own
`timing_s/*` per step, the wall time per step and of the whole run; prints a table and writes JSON
(benchmarks/results/verl_cpu_step.json).

    python benchmarks/bench_verl_cpu_step.py               # 20 steps per variant, ~6 min
    python benchmarks/bench_verl_cpu_step.py --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time

VARIANTS = {
    "verl defaults": ({"M2PO_CPU_REPLAY_POLL_S": "2", "M2PO_CPU_LOG_FILTER": "0", "TQ_NUM_THREADS": "8"}, []),
    "cpu backend": ({}, []),
}
PHASES = ("gen", "old_log_prob", "adv", "update_actor", "update_weights", "step")


def run_variant(name: str, steps: int, workdir: str, cache: str) -> dict:
    import torch

    from m2po.testbed import verl_engine
    from m2po.testbed.config import preset
    from m2po.testbed.sft import base_policy

    env, extra = VARIANTS[name]
    config = preset("default")
    config = dataclasses.replace(config, engine="verl", methods=("grpo_s0",), seeds=(0,),
                                 rl=dataclasses.replace(config.rl, iterations=steps, eval_every=steps,
                                                        checkpoint_every=steps))
    torch.set_num_threads(1)
    base = base_policy(config, cache, progress=False)
    train, val = verl_engine.write_data(config, os.path.join(workdir, "data"))
    run_dir = os.path.join(workdir, name.replace(" ", "-"))
    started = time.time()
    verl_engine.run_method(config, "grpo_s0", 0, base, train, val, run_dir, timeout_s=1800,
                           extra_overrides=tuple(extra), env=env)
    wall = time.time() - started
    steps_logged, _ = verl_engine.read_run(run_dir)
    timed = [steps_logged[s] for s in sorted(steps_logged) if s > 1]
    result = {f"{phase}_s": statistics.fmean(m[f"timing_s/{phase}"] for m in timed if f"timing_s/{phase}" in m)
              for phase in PHASES}
    testing = [m["timing_s/testing"] for m in steps_logged.values() if "timing_s/testing" in m]
    result.update(run_wall_s=wall, steps=steps, validation_512_s=statistics.fmean(testing) if testing else None)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--cache", default="outputs/testbed/cache",
                        help="where the testbed's base policy is cached (default: the main job's)")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the first step is left out of the means)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="m2po-bench-verl-") as workdir:
        for name in VARIANTS:
            print(f"[bench] {name}: {args.steps} steps of verl's main_ppo ...", flush=True)
            results[name] = run_variant(name, args.steps, workdir, args.cache)
    header = ["variant", *[f"{p} (s)" for p in PHASES], "validation, 512 (s)", "run wall (s)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, r in results.items():
        cells = [f"{r[f'{p}_s']:.2f}" for p in PHASES]
        cells += [f"{r['validation_512_s']:.1f}" if r["validation_512_s"] else "-", f"{r['run_wall_s']:.0f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "verl_cpu_step.json")
    with open(path, "w") as f:
        json.dump({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
