"""Helpers for the end-to-end tests that run verl's real `main_ppo` on the CPU backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from m2po.configs import config_dir
from m2po.utils.processes import supervise

SYNC_LOG = "rollout-syncs.jsonl"


@dataclass
class Run:
    returncode: int
    log: str
    metrics: list[dict]  # the file logger's records: {"step": n, "data": {...}}
    output_dir: str

    def by_step(self) -> dict[int, dict]:
        return {record["step"]: record["data"] for record in self.metrics}

    def rollout_syncs(self) -> list[dict]:
        """One record per weight sync received by a rollout server (replica, weight_version, checksum)."""
        return read_jsonl(os.path.join(self.output_dir, SYNC_LOG), missing_ok=True)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])


def main_ppo_command(overrides: list[str], config_name: str = "m2po_trainer") -> list[str]:
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path",
        config_dir(),
        "--config-name",
        config_name,
        "+cpu=tiny",
        *overrides,
    ]


def cpu_env(cache_dir: str, metrics_file: str, output_dir: str) -> dict:
    from m2po.cpu_backend.rollout import SYNC_LOG_ENV

    env = dict(os.environ)
    env.update(
        VERL_PLATFORM="cpu",
        M2PO_CACHE=cache_dir,
        VERL_FILE_LOGGER_PATH=metrics_file,
        **{SYNC_LOG_ENV: os.path.join(output_dir, SYNC_LOG)},
        RAY_DEDUP_LOGS="0",
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


def read_jsonl(path: str, missing_ok: bool = False, skip_cut_lines: bool = False) -> list[dict]:
    """Every record of a JSON-lines file; [] for a missing file only when `missing_ok`; with
    `skip_cut_lines`, a line a crash cut short is left out instead of failing the read."""
    if missing_ok and not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if not skip_cut_lines:
                    raise
    return records


def run_main_ppo(
    workdir: str,
    name: str,
    overrides: list[str],
    cache_dir: str,
    timeout_s: int = 480,
    kill_when=None,
    config_name: str = "m2po_trainer",
    shared_metrics_file: bool = False,
) -> Run:
    """Run verl's main_ppo on CPU in `workdir`; outputs under `<workdir>/<name>`.

    `kill_when(output_dir)`: polled every 0.2 s; when it returns True the whole process group is
    SIGKILLed (a crash: no cleanup, no final save). `shared_metrics_file`: every attempt logs where
    verl's file logger logs by default, `<workdir>/<name>.jsonl` beside the run's folder, as the paper
    scripts do (otherwise each attempt logs to its own `<name>/metrics-<n>.jsonl`).
    """
    output_dir = os.path.join(workdir, name)
    os.makedirs(output_dir, exist_ok=True)
    attempt = len([f for f in os.listdir(output_dir) if f.startswith("metrics-") and f.endswith(".log")])
    metrics_file = os.path.join(output_dir, f"metrics-{attempt}.jsonl")
    log_path = metrics_file.replace(".jsonl", ".log")
    env = cpu_env(cache_dir, metrics_file, output_dir)
    if shared_metrics_file:
        metrics_file = os.path.join(workdir, f"{name}.jsonl")
        env.pop("VERL_FILE_LOGGER_PATH")
        env["VERL_FILE_LOGGER_ROOT"] = os.path.dirname(workdir)
        overrides = [f"trainer.project_name={os.path.basename(workdir)}", *overrides]
    command = main_ppo_command(
        [
            f"trainer.default_local_dir={output_dir}",
            f"trainer.experiment_name={name}",
            "trainer.logger=[console,file]",
            *overrides,
        ],
        config_name=config_name,
    )
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            # a crash test's kill should land close to its condition: poll it often
            supervise(process, timeout_s, kill_when=None if kill_when is None else lambda: kill_when(output_dir),
                      poll_s=1.0 if kill_when is None else 0.2)
        except TimeoutError:
            raise TimeoutError(f"main_ppo {name} ran past {timeout_s} s; log: {log_path}") from None
    with open(log_path, errors="replace") as f:
        log_text = f.read()
    killed = process.returncode == -9  # a SIGKILL may cut the last line
    return Run(process.returncode, log_text, read_jsonl(metrics_file, missing_ok=True, skip_cut_lines=killed), output_dir)
