"""The testbed's experiment through verl's own trainer: `python -m m2po.testbed --engine verl`.

Each (method, seed) is one run of verl's unmodified `python -m verl.trainer.main_ppo` on CPU (the
CPU backend, `VERL_PLATFORM=cpu` and `+cpu=tiny`) with the overlay `+testbed=verl`
(configs/testbed/verl.yaml) and the product's pieces: the trainer modes `m2po_stale` (verl's sync
trainer + the stale@k buffer) and `m2po_separate_async` (verl's asynchronous trainer), verl's
FSDP actor, the `hf` rollout server, the task's reward inside verl's reward loop
(`m2po.testbed.verl_reward`), verl's validation and file logger. What it shares with the testbed's
own loop (`m2po.testbed.rl`): the base policy (the same weights), the task, the held-out problems and
every setting (`verl_overrides` derives them from the same `TestbedConfig`).

A run folder (`<out>/runs/<method>-seed<k>/`) is verl's `trainer.default_local_dir`: checkpoints,
the stale ledger, `metrics/attempt-<n>.jsonl` (verl's file logger, one file per attempt, since verl
truncates its file when a run is resumed; `m2po report` merges them) and `logs/attempt-<n>.log`.
Running the same command again resumes every unfinished run from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from m2po.testbed.config import VERL_METHODS, TestbedConfig
from m2po.testbed.task import task_to_json
from m2po.utils.atomic_io import atomic_write_bytes
from m2po.utils.processes import kill_session, session_members, supervise
from m2po.utils.verl_metrics import attempt_files, merge_attempts, next_attempt_file

DONE = "done.json"
LOGS_DIR = "logs"
RUNNING = "running.json"  # the session id of a run's main_ppo while it runs
ATTEMPTS = "attempts.jsonl"  # in LOGS_DIR: one line per attempt (wall time, exit code, last step logged)
# Set (e.g. on SIGTERM or Ctrl-C of the launcher): every running main_ppo is stopped and its run
# raises `RunStopped`; its last checkpoint is where the same command resumes.
STOP = threading.Event()
ACCURACY_KEY = "val-core/{source}/acc/mean@1"


def data_source(config: TestbedConfig) -> str:
    return config.task.name


def accuracy_key(config: TestbedConfig) -> str:
    return ACCURACY_KEY.format(source=data_source(config))


# ---------------------------------------------------------------------- data


def task_rows(config: TestbedConfig, operands, split: str) -> list[dict]:
    """verl RL rows (chat prompt, ground truth, data source) for `(count, 2)` operands; `extra_info`
    carries what the reward needs (operands and the task's definition, `m2po.testbed.verl_reward`)."""
    task = config.task
    digits = task.num_digits
    rows = []
    for index, (a, b) in enumerate(operands.tolist()):
        rows.append(
            {
                "data_source": data_source(config),
                "prompt": [{"role": "user", "content": f"{a:0{digits}d}+{b:0{digits}d}="}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": index, "a": a, "b": b, "task": task_to_json(task)},
            }
        )
    return rows


def write_data(config: TestbedConfig, directory: str) -> tuple[str, str]:
    """train.parquet and val.parquet for the task (rebuilt only when missing).

    val: the testbed's held-out problems, the very set `m2po.testbed.evaluation.evaluate` scores. train: uniform random problems as the testbed draws them each
    iteration, enough for every step, the stale warm-up and the asynchronous trainer's extra prompts
    twice over (verl's dataloader reshuffles and starts again past the end)."""
    import pandas as pd
    import torch

    from m2po.testbed.evaluation import held_out_problems
    from m2po.utils.atomic_io import atomic_directory

    rl = config.rl
    paths = tuple(os.path.join(directory, f"{split}.parquet") for split in ("train", "val"))
    if all(os.path.isfile(p) for p in paths):
        return paths
    warmup = rl.staleness_updates // rl.mini_batches
    train_count = 2 * rl.prompts_per_iteration * (rl.iterations + warmup)
    train = config.task.sample_operands(train_count, torch.Generator().manual_seed(config.base_seed + 1))
    held_out = held_out_problems(config.task, rl.eval_problems, seed=0)
    with atomic_directory(directory) as tmp:
        for split, operands in (("train", train), ("val", held_out)):
            pd.DataFrame(task_rows(config, operands, split)).to_parquet(os.path.join(tmp, f"{split}.parquet"), index=False)
    return paths


# ---------------------------------------------------------------------- config


def verl_overrides(config: TestbedConfig, method: str, seed: int, base_path: str, train_file: str, val_file: str,
                   run_dir: str) -> list[str]:
    """The hydra overrides (after `+cpu=tiny +testbed=verl`) of one run: the testbed's settings from
    `config`, the method's loss and trainer, the seed (data order and rollout sampling)."""
    if method not in VERL_METHODS:
        raise ValueError(f"method must be one of {list(VERL_METHODS)}, got {method!r}")
    rl, spec = config.rl, VERL_METHODS[method]
    if rl.m2po_variant != "mask":
        raise ValueError(f"rl.m2po_variant={rl.m2po_variant!r}: the verl engine runs the paper's mask variant only")
    if rl.warmup != "base_policy":
        raise ValueError("rl.warmup: verl's trainer runs the paper's base_policy warm-up only (docs/stale-k.md)")
    grad_clip = rl.grad_clip if rl.grad_clip is not None else 1e9  # the testbed's None: no clipping
    overrides = [
        "+cpu=tiny",
        "+testbed=verl",
        f"actor_rollout_ref.model.path={base_path}",
        f"data.train_files={train_file}",
        f"data.val_files={val_file}",
        f"data.train_batch_size={rl.prompts_per_iteration}",
        f"data.max_prompt_length={config.task.prompt_len}",
        f"data.max_response_length={config.task.response_len}",
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.n={rl.samples_per_prompt}",
        f"actor_rollout_ref.rollout.seed={1000 + seed}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={rl.prompts_per_iteration // rl.mini_batches}",
        f"actor_rollout_ref.actor.optim.lr={rl.lr}",
        f"actor_rollout_ref.actor.optim.clip_grad={grad_clip}",
        f"actor_rollout_ref.actor.clip_ratio={rl.clip_ratio}",
        f"actor_rollout_ref.actor.clip_ratio_low={rl.clip_ratio}",
        f"actor_rollout_ref.actor.clip_ratio_high={rl.clip_ratio}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={spec.loss_mode}",
        f"actor_rollout_ref.actor.policy_loss.m2_threshold={rl.m2_threshold}",
        f"m2po.stale.staleness_updates={rl.staleness_updates if spec.stale else 0}",
        f"trainer.total_training_steps={rl.iterations}",
        f"trainer.test_freq={rl.eval_every}",
        f"trainer.save_freq={rl.checkpoint_every}",
        f"trainer.experiment_name={method}-seed{seed}",
        f"trainer.default_local_dir={run_dir}",
    ]
    if spec.asynchronous:
        # verl's separate_async: one training worker and one standalone `hf` replica synced through the
        # object store; a weight sync every `mini_batches` updates (one global step, as in the sync runs)
        overrides += [
            "+async=separate",
            f"trainer.v1.separate_async.parameter_sync_step={rl.mini_batches}",
            "trainer.n_gpus_per_node=1",
            "actor_rollout_ref.rollout.nnodes=1",
            "actor_rollout_ref.rollout.n_gpus_per_node=1",
            "actor_rollout_ref.rollout.checkpoint_engine.backend=m2po_cpu",
        ]
    return overrides


def main_ppo_command(overrides: list[str]) -> list[str]:
    from m2po.configs import config_dir

    return [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", config_dir(), "--config-name",
            "m2po_trainer", *overrides]


def run_env(metrics_file: str) -> dict:
    env = dict(os.environ)
    env.update(VERL_PLATFORM="cpu", VERL_FILE_LOGGER_PATH=metrics_file, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("RAY_ADDRESS", None)  # every run starts its own Ray cluster
    return env


# ---------------------------------------------------------------------- runs


class RunFailed(RuntimeError):
    pass


class RunStopped(RuntimeError):
    pass


def run_method(config: TestbedConfig, method: str, seed: int, base_path: str, train_file: str, val_file: str,
               run_dir: str, timeout_s: float | None = None, kill_after_step: int | None = None,
               extra_overrides: tuple[str, ...] = (), env: dict | None = None) -> dict:
    """One (method, seed) through verl's main_ppo; resumes from the run's last checkpoint. Returns the
    summary written to done.json. `kill_after_step`: SIGKILL the run once that step is logged (for
    the resume test; the run then stops there without done.json). `extra_overrides`: hydra overrides
    applied last; `env`: extra environment variables. Paths are made absolute: main_ppo runs in
    `run_dir`."""
    base_path, train_file, val_file, run_dir = (os.path.abspath(p) for p in (base_path, train_file, val_file, run_dir))
    done_path = os.path.join(run_dir, DONE)
    if os.path.exists(done_path):
        with open(done_path) as f:
            return json.load(f)
    os.makedirs(os.path.join(run_dir, LOGS_DIR), exist_ok=True)
    _stop_orphan(run_dir)
    metrics_file = next_attempt_file(run_dir)
    open(metrics_file, "a").close()  # claims the number: an attempt that fails before logging keeps its log
    log_path = os.path.join(run_dir, LOGS_DIR, os.path.basename(metrics_file).replace(".jsonl", ".log"))
    attempt = os.path.basename(metrics_file).removesuffix(".jsonl")
    overrides = verl_overrides(config, method, seed, base_path, train_file, val_file, run_dir)
    # hydra's own record of the composed config, per attempt, beside the logs
    command = main_ppo_command([*overrides, *extra_overrides,
                                f"hydra.run.dir={os.path.join(run_dir, LOGS_DIR, 'hydra-' + attempt)}"])
    started = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=run_dir, env={**run_env(metrics_file), **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        atomic_write_bytes(os.path.join(run_dir, RUNNING), json.dumps({"session": process.pid}).encode())
        try:
            supervise(process, timeout_s, stop=STOP,
                      kill_when=None if kill_after_step is None else lambda: _logged_step(metrics_file) >= kill_after_step)
        except TimeoutError:
            raise RunFailed(f"{method} seed {seed}: main_ppo ran past {timeout_s:.0f} s; log: {log_path}") from None
        except InterruptedError:
            raise RunStopped(f"{method} seed {seed}: stopped; the same command resumes it") from None
        finally:
            if os.path.exists(os.path.join(run_dir, RUNNING)):
                os.remove(os.path.join(run_dir, RUNNING))
            record = {"attempt": attempt, "wall_s": round(time.time() - started, 1), "returncode": process.returncode,
                      "last_step": _logged_step(metrics_file)}
            with open(os.path.join(run_dir, LOGS_DIR, ATTEMPTS), "a") as f:
                f.write(json.dumps(record) + "\n")
    if kill_after_step is not None and process.returncode == -signal.SIGKILL:
        return {"method": method, "seed": seed, "killed_after_step": kill_after_step}
    if process.returncode != 0:
        raise RunFailed(f"{method} seed {seed}: main_ppo exited with {process.returncode}; log: {log_path}")
    steps, _ = merge_attempts(attempt_files(run_dir))
    if max(steps, default=0) < config.rl.iterations:
        raise RunFailed(f"{method} seed {seed}: main_ppo ended at step {max(steps, default=0)} of "
                        f"{config.rl.iterations}; log: {log_path}")
    summary = {"method": method, "seed": seed, "attempts": len(attempt_files(run_dir)),
               "wall_s_last_attempt": round(time.time() - started, 1)}
    atomic_write_bytes(done_path, json.dumps(summary).encode())
    return summary


def _logged_step(metrics_file: str) -> int:
    """The last step verl's file logger has written (0 before the first)."""
    if not os.path.exists(metrics_file):
        return 0
    with open(metrics_file, "rb") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the launching thread dies (Linux), so that killing
    `python -m m2po.testbed` does not leave main_ppo training on without it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop_orphan(run_dir: str) -> None:
    """A previous attempt's processes (Ray's, whose driver died with a killed launcher) still in their
    session would train into the same folder: they are stopped before the run resumes."""
    path = os.path.join(run_dir, RUNNING)
    if not os.path.exists(path):
        return
    with open(path) as f:
        session = int(json.load(f)["session"])
    if any("ray" in args or "verl" in args for _, args in session_members(session)):
        kill_session(session)
    os.remove(path)


def export_final_policy(run_dir: str) -> str:
    """The actor of a finished run's last checkpoint as an HF folder (`<run>/final_model`, made once with
    verl's own `python -m verl.model_merger`), for re-evaluation with the testbed's `evaluate`."""
    from m2po.testbed.rl import FINAL_POLICY
    from m2po.utils.atomic_io import atomic_directory

    out = os.path.join(run_dir, FINAL_POLICY)
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    with open(os.path.join(run_dir, "latest_checkpointed_iteration.txt")) as f:
        step = int(f.read().strip())
    actor = os.path.join(run_dir, f"global_step_{step}", "actor")
    with atomic_directory(out) as tmp:
        merged = subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                                 actor, "--target_dir", tmp], capture_output=True, text=True)
        if merged.returncode != 0:
            raise RunFailed(f"verl.model_merger could not export {actor}: {merged.stderr[-2000:]}")
    return out


def attempts_wall_s(run_dir: str) -> float | None:
    """The wall time of every attempt of a run, summed (None before the first attempt ended)."""
    path = os.path.join(run_dir, LOGS_DIR, ATTEMPTS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return sum(json.loads(line)["wall_s"] for line in f if line.strip())


def read_run(run_dir: str) -> tuple[dict[int, dict[str, float]], list[str]]:
    """A run's metrics by step, every attempt merged (the later attempt wins), and notes."""
    return merge_attempts(attempt_files(run_dir))
