"""The embedded main job: base policy, then every (method, seed) run in parallel, then the report.

    python -m m2po.testbed                 # default experiment: copy_add task, 4 methods x 3 seeds (~12 min on 2 cores)
    python -m m2po.testbed --task addition # the answer-only addition task (~11 min)
    python -m m2po.testbed --quick         # CI smoke preset (about 1 min)
    python -m m2po.testbed --engine verl   # the same experiment through verl's main_ppo on CPU (~2.5 h), with
                                           # verl's asynchronous trainer too, cross-checked (docs/testbed-verl.md)

Re-running the same command resumes: finished runs are kept, interrupted ones continue from their
last checkpoint, and the report is rebuilt.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shlex
import signal
import sys
import time

from m2po.testbed.config import DEFAULT_TASK, ENGINES, TestbedConfig, preset
from m2po.testbed.task import TASKS

DEFAULT_OUT = "outputs/testbed"
DEFAULT_VERL_SEEDS = (0,)  # one seed per method by default: a verl run costs ~10x a testbed run


def _run_worker(args):
    config, method, seed, base_path, run_dir, loggers = args
    import torch

    torch.set_num_threads(1)  # one run per core
    from m2po.testbed.rl import run

    return run(config, method, seed, base_path, run_dir, progress=False, loggers=loggers)


def _claim_out_dir(config: TestbedConfig, out_dir: str) -> None:
    """config.json of a results folder: written once; a different configuration there is refused."""
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            if json.load(f) != json.loads(json.dumps(config.to_json())):
                raise SystemExit(
                    f"{out_dir} holds results of a different configuration; use another --out or delete it"
                )
    else:
        with open(config_path, "w") as f:
            json.dump(config.to_json(), f, indent=1)


def run_experiment(config: TestbedConfig, out_dir: str, workers: int, command: str, loggers: tuple[str, ...] = (),
                   cache_dir: str | None = None) -> str:
    """Every (method, seed) of `config` into `out_dir` (resumable), then the report; returns summary.md's
    path. `cache_dir`: where the base policy is cached (default `<out_dir>/cache`; a sweep shares one)."""
    import torch

    from m2po.testbed.report import write_report
    from m2po.testbed.rl import read_runs
    from m2po.testbed.sft import base_policy, load_base

    started = time.time()
    _claim_out_dir(config, out_dir)

    # One thread, whatever the core count: with two, the SFT ran 3.3x slower whenever another process
    # kept one core busy (OpenMP threads waiting on each other; measured), and one thread gives the same
    # base policy on every machine load.
    torch.set_num_threads(1)
    cache_dir = cache_dir or os.path.join(out_dir, "cache")
    print(f"[testbed] base policy (SFT warm-up, cached in {cache_dir}) ...", flush=True)
    base_path = base_policy(config, cache_dir)
    _, base_accuracy = load_base(base_path)
    print(f"[testbed] base policy accuracy {base_accuracy:.3f}", flush=True)

    jobs = [
        (config, method, seed, base_path, os.path.join(out_dir, "runs", f"{method}-seed{seed}"), loggers)
        for seed in config.seeds
        for method in config.methods
    ]
    already_done = sum(os.path.exists(os.path.join(job[4], "done.json")) for job in jobs)
    print(f"[testbed] {len(jobs)} runs ({already_done} already done), {workers} at a time", flush=True)
    from tqdm import tqdm

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for summary in tqdm(pool.imap_unordered(_run_worker, jobs), total=len(jobs), desc="runs", disable=None):
            tqdm.write(f"[testbed] done: {summary['method']} seed {summary['seed']}")

    runs = read_runs(out_dir, {method: config.seeds for method in config.methods})
    elapsed = time.time() - started
    summary_path = os.path.join(out_dir, "summary.json")
    if already_done == len(jobs) and os.path.exists(summary_path):
        with open(summary_path) as f:  # only the report is rebuilt: keep the measured time
            elapsed = json.load(f).get("elapsed_s", elapsed)
    path = write_report(out_dir, base_accuracy, runs, config.to_json(), command, elapsed)
    print(f"[testbed] report: {path}", flush=True)
    return path


def _testbed_results(config: TestbedConfig, testbed_out: str):
    """(summary.json, method -> seed -> records) of the testbed's own runs in `testbed_out` when they
    ran the same experiment as `config`, else (None, None)."""
    from m2po.testbed.rl import read_runs

    try:
        with open(os.path.join(testbed_out, "summary.json")) as f:
            summary = json.load(f)
    except FileNotFoundError:
        return None, None
    theirs = TestbedConfig.experiment_json_of(summary["config"])
    if theirs != json.loads(json.dumps(config.experiment_json())):
        print(f"[testbed] {testbed_out} ran a different experiment: no cross-check", flush=True)
        return None, None
    return summary, read_runs(testbed_out, summary["runs"])


def run_verl_experiment(config: TestbedConfig, out_dir: str, testbed_out: str, workers: int, command: str,
                        kill_after_step: int | None = None) -> str:
    """Every (method, seed) through verl's main_ppo on CPU (m2po.testbed.verl_engine), then the report
    and the cross-check against the testbed's own runs in `testbed_out` (same base policy file)."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    import torch
    from tqdm import tqdm

    from m2po.testbed.sft import base_policy, load_base
    from m2po.testbed.verl_engine import STOP, RunFailed, RunStopped, run_method, write_data
    from m2po.testbed.verl_report import load_verl_runs, write_verl_report

    started = time.time()
    _claim_out_dir(config, out_dir)
    torch.set_num_threads(1)  # as the testbed: the same base policy whatever the machine's load
    # the testbed's cache: both engines train the very same base policy file
    print(f"[testbed] base policy (SFT warm-up, cached in {testbed_out}/cache) ...", flush=True)
    base_path = base_policy(config, os.path.join(testbed_out, "cache"))
    print(f"[testbed] base policy accuracy {load_base(base_path)[1]:.3f} (the testbed's evaluation)", flush=True)
    train_file, val_file = write_data(config, os.path.join(out_dir, "data"))
    jobs = [(method, seed) for seed in config.seeds for method in config.methods]
    already_done = sum(os.path.exists(os.path.join(out_dir, "runs", f"{m}-seed{s}", "done.json")) for m, s in jobs)
    print(f"[testbed] {len(jobs)} runs of verl's main_ppo, {workers} at a time; logs in {out_dir}/runs/<run>/logs",
          flush=True)
    failures = []
    previous = {sig: signal.signal(sig, lambda *_: STOP.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {
                pool.submit(run_method, config, method, seed, base_path, train_file, val_file,
                            os.path.join(out_dir, "runs", f"{method}-seed{seed}"), None, kill_after_step): (method, seed)
                for method, seed in jobs
            }
            for future in tqdm(as_completed(futures), total=len(futures), desc="verl runs", disable=None):
                try:
                    summary = future.result()
                except RunStopped:
                    continue
                except RunFailed as error:  # the other runs go on; the failures are listed at the end
                    failures.append(str(error))
                    tqdm.write(f"[testbed] FAILED: {error}")
                    continue
                tqdm.write(f"[testbed] {'killed' if 'killed_after_step' in summary else 'done'}: "
                           f"{summary['method']} seed {summary['seed']}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if STOP.is_set():
        raise SystemExit("[testbed] stopped; the same command resumes every unfinished run from its last checkpoint")
    if failures:
        raise SystemExit("[testbed] runs failed:\n  " + "\n  ".join(failures))
    if kill_after_step is not None:
        print(f"[testbed] every run was SIGKILLed after step {kill_after_step}; run the command again without "
              "--kill-after-step to resume them", flush=True)
        return ""
    testbed_summary, testbed_runs = _testbed_results(config, testbed_out)
    elapsed = time.time() - started
    summary_path = os.path.join(out_dir, "summary.json")
    if already_done == len(jobs) and os.path.exists(summary_path):
        with open(summary_path) as f:  # only the report is rebuilt: keep the measured time
            elapsed = json.load(f).get("elapsed_s", elapsed)
    from m2po.testbed.rl import FINAL_POLICY
    from m2po.testbed.verl_engine import export_final_policy

    runs = load_verl_runs(out_dir, config)
    print("[testbed] re-evaluating the final policies ...", flush=True)
    verl_finals = {m: {s: export_final_policy(os.path.join(out_dir, "runs", f"{m}-seed{s}")) for s in seeds}
                   for m, seeds in runs.items()}
    testbed_finals = {m: {s: os.path.join(testbed_out, "runs", f"{m}-seed{s}", FINAL_POLICY) for s in seeds}
                      for m, seeds in (testbed_runs or {}).items()}
    path = write_verl_report(out_dir, config, runs, testbed_summary, testbed_runs, command, elapsed,
                             verl_final_models=verl_finals, testbed_final_models=testbed_finals)
    print(f"[testbed] report: {path}", flush=True)
    return path


_NO_CLIP = "none"  # argparse's value for --grad-clip none (None already means "not given")


def _grad_clip(text: str):
    if text.strip().lower() == _NO_CLIP:
        return _NO_CLIP
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2po.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke preset: 1 seed, 24 iterations (about 1 min)")
    parser.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK,
                        help=f"addition: the answer only; copy_add: operands restated before the answer (default {DEFAULT_TASK})")
    parser.add_argument("--out", default=None, help=f"results folder (default {DEFAULT_OUT}[-<task> unless the default task][-quick])")
    parser.add_argument("--engine", choices=list(ENGINES), default="testbed",
                        help="testbed: the package's own RL loop (default); verl: every run through verl's main_ppo on "
                             "CPU, with verl's asynchronous trainer too, cross-checked against the testbed's results")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel runs (default: cores)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"default: 0 1 2 (--engine verl: {' '.join(map(str, DEFAULT_VERL_SEEDS))})")
    parser.add_argument("--methods", nargs="+", choices=sorted(set().union(*ENGINES.values())), default=None,
                        help="default: every method of the engine")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--staleness", type=int, default=None, help="k in model updates for the stale runs")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--grad-clip", type=_grad_clip, default=None, metavar="NORM|none",
                        help="clip the gradient norm at NORM; 'none' trains without clipping")
    parser.add_argument("--m2-micro-batch", type=int, default=None, metavar="K",
                        help="call the loss per K-sequence micro-batch (M2PO's cut per micro-batch, verl's "
                             "policy_loss.m2_scope=micro_batch); default: per mini-batch")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-problems", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--logger", nargs="+", default=[], choices=["tensorboard", "wandb", "mlflow", "swanlab", "file"],
                        help="also log through verl's trackers (tensorboard logs go to <out>/runs/<run>/tensorboard)")
    parser.add_argument("--testbed-out", default=None,
                        help="--engine verl: the testbed's results to cross-check against, and whose cached base policy "
                             "to train (default: the testbed's default results folder for the task)")
    parser.add_argument("--kill-after-step", type=int, default=None,
                        help="--engine verl: simulate a crash, SIGKILL each run once verl has logged this step; the same "
                             "command without it resumes every run from its last checkpoint")
    args = parser.parse_args(argv)

    config = preset("quick" if args.quick else "default", args.task)
    if args.engine == "verl":
        config = dataclasses.replace(config, engine="verl", methods=tuple(ENGINES["verl"]), seeds=DEFAULT_VERL_SEEDS)
    elif args.testbed_out or args.kill_after_step is not None:
        parser.error("--testbed-out and --kill-after-step go with --engine verl")
    rl_changes = {k: v for k, v in {"iterations": args.iterations, "staleness_updates": args.staleness,
                                     "lr": args.lr, "grad_clip": args.grad_clip, "eval_every": args.eval_every,
                                     "m2_micro_batch": args.m2_micro_batch,
                                     "eval_problems": args.eval_problems,
                                     "checkpoint_every": args.checkpoint_every}.items() if v is not None}
    if args.grad_clip == _NO_CLIP:
        rl_changes["grad_clip"] = None
    try:
        if args.sft_steps is not None:
            config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, steps=args.sft_steps))
        if rl_changes:
            config = dataclasses.replace(config, rl=dataclasses.replace(config.rl, **rl_changes))
        if args.seeds:
            config = dataclasses.replace(config, seeds=tuple(args.seeds))
        if args.methods:
            config = dataclasses.replace(config, methods=tuple(args.methods))
    except ValueError as error:
        parser.error(str(error))
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.kill_after_step is not None and args.kill_after_step < 1:
        parser.error("--kill-after-step must be >= 1")
    task_suffix = "" if args.task == DEFAULT_TASK else f"-{args.task}"
    testbed_out = DEFAULT_OUT + task_suffix + ("-quick" if args.quick else "")
    command = "python -m m2po.testbed " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.engine == "verl":
        if args.logger:
            parser.error("--logger: verl runs log through verl's own trackers (console and file)")
        out_dir = args.out or testbed_out.replace(DEFAULT_OUT, DEFAULT_OUT + "-verl", 1)
        run_verl_experiment(config, out_dir, args.testbed_out or testbed_out, args.workers, command.strip(),
                            args.kill_after_step)
        return 0
    run_experiment(config, args.out or testbed_out, args.workers, command.strip(), tuple(args.logger))
    return 0
