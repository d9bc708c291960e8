"""`m2po check --gpu`: one command that proves an install on a GPU machine, ending with a pass/fail table.

    pip install -e ".[gpu]"      # verl[vllm] 0.9.1 and cupy (the async scripts' nccl checkpoint engine)
    m2po check --gpu             # meant to take under ten minutes on one GPU (not yet timed on one)

Rows: the plugin's registration in a fresh `import verl` (`m2po check`); torch, CUDA, NCCL, vLLM,
flash-attn and cupy versions; `pytest -m gpu` (from a source checkout); then a few real steps of verl's
`main_ppo` with the vLLM rollout and FSDP on a tiny model built offline (no download): `m2po_stale`
(k = 4 updates) and an asynchronous mode the GPU count allows (`m2po_separate_async` with 2+ GPUs,
trainer and rollout on half each; `m2po_colocate_async` with one). A run passes when it exits 0, logs
every step with M2PO's metrics and, for stale@k, its ledger holds exactly k-updates-old batches after the
warm-up. Without a CUDA device it runs what it can and marks the rest skipped, with the reason; the
CPU path of the same trainers is `make test`'s end-to-end tests (the CPU backend).

This package has not yet run this check on a GPU (docs/verification.md).
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
import tempfile
from importlib import metadata

STALE_K, STALE_STEPS = 4, 4  # u = 2 updates per step: two warm-up batches, then every batch is 4 updates old
ASYNC_STEPS = 3
RUN_TIMEOUT_S = 240


@dataclasses.dataclass
class Row:
    check: str
    status: str  # "pass" | "FAIL" | "skip"
    detail: str


def _version(module: str) -> str | None:
    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def environment_rows(cuda: bool) -> list[Row]:
    import torch

    rows = [Row("torch", "pass", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not cuda:
        rows.append(Row("CUDA device", "skip", "torch.cuda.is_available() is False"))
        return rows
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    rows.append(Row("CUDA device", "pass", f"{torch.cuda.device_count()} x {', '.join(names)}"))
    nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
    nccl_text = ".".join(map(str, nccl)) if isinstance(nccl, (tuple, list)) else str(nccl)  # an int in old torch
    rows.append(Row("NCCL", "pass" if nccl else "FAIL", nccl_text if nccl else "not available in torch"))
    for package, why in (("vllm", "the rollout of every shipped script"),
                         ("flash-attn", "attention kernels (verl's FSDP actor)"),
                         ("cupy-cuda12x", "the async scripts' nccl checkpoint engine")):
        version = _version(package)
        rows.append(Row(package, "pass" if version else "FAIL",
                        version or f"not installed: needed for {why} (pip install -e '.[gpu]')"))
    return rows


def registration_row() -> Row:
    from m2po.selfcheck import run_check

    out = io.StringIO()
    code = run_check(stream=out)
    last = out.getvalue().strip().splitlines()[-1]
    return Row("plugin registered (m2po check)", "pass" if code == 0 else "FAIL", last)


def gpu_tests_row(cuda: bool, tests_dir: str | None) -> Row:
    if not cuda:
        return Row("pytest -m gpu", "skip", "no CUDA device")
    if tests_dir is None or not os.path.isdir(tests_dir):
        return Row("pytest -m gpu", "skip", "the tests are in the source checkout (pass --tests-dir)")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", tests_dir], capture_output=True,
                            text=True, timeout=600)
    last = (result.stdout.strip().splitlines() or ["no output"])[-1]
    return Row("pytest -m gpu", "pass" if result.returncode == 0 else "FAIL", last)


def build_tiny_task(directory: str) -> dict[str, str]:
    """The CPU backend's addition task and tokenizer with a model whose head size the GPU kernels take
    (64), saved as an HF folder: built offline, nothing downloaded."""
    import pandas as pd

    from m2po.cpu_backend import tiny

    model_dir = os.path.join(directory, "model")
    tiny.build_model(hidden_size=256, intermediate_size=512, num_attention_heads=4).save_pretrained(model_dir)
    tiny.build_tokenizer().save_pretrained(model_dir)
    paths = {"model": model_dir}
    for split, count, seed in (("train", 256, 1), ("val", 16, 2)):
        paths[split] = os.path.join(directory, f"{split}.parquet")
        pd.DataFrame(tiny.addition_rows(count, split, seed)).to_parquet(paths[split], index=False)
    return paths


def run_overrides(kind: str, gpus: int, paths: dict[str, str], out_dir: str) -> list[str]:
    """main_ppo overrides (after `--config-name m2po_trainer`) of one check run: `stale` or `async`."""
    common = [
        f"actor_rollout_ref.model.path={paths['model']}",
        f"data.train_files={paths['train']}",
        f"data.val_files={paths['val']}",
        "data.train_batch_size=8",
        "data.max_prompt_length=32",
        "data.max_response_length=16",
        # the tiny task's exact-answer reward (the CPU backend's), no math-verify needed
        "reward.custom_reward_function.path=pkg://m2po.cpu_backend.smoke_reward",
        "reward.custom_reward_function.name=compute_score",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "trainer.logger=[console,file]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.nnodes=1",
        f"trainer.default_local_dir={os.path.join(out_dir, kind)}",
        f"trainer.experiment_name=gpu-check-{kind}",
    ]
    if kind == "stale":
        return [*common, f"trainer.n_gpus_per_node={gpus}", f"trainer.total_training_steps={STALE_STEPS}",
                f"m2po.stale.staleness_updates={STALE_K}"]
    if kind != "async":
        raise ValueError(f"kind must be 'stale' or 'async', got {kind!r}")
    overrides = [*common, f"trainer.total_training_steps={ASYNC_STEPS}", "m2po.stale.staleness_updates=0",
                 "algorithm.rollout_correction.bypass_mode=true", "actor_rollout_ref.rollout.calculate_log_probs=true"]
    if gpus >= 2:  # trainer and standalone rollout on half the GPUs each, weights over NCCL
        half = gpus // 2
        return [*overrides, "+async=separate", f"trainer.n_gpus_per_node={half}",
                f"actor_rollout_ref.rollout.n_gpus_per_node={half}"]
    return [*overrides, "trainer.v1.trainer_mode=m2po_colocate_async", "trainer.n_gpus_per_node=1"]


def main_ppo_row(kind: str, gpus: int, paths: dict[str, str], out_dir: str) -> Row:
    from m2po.configs import config_dir
    from m2po.utils.verl_metrics import read_metrics
    from m2po.verl_integration.ledger import LEDGER_FILE, read_ledger

    name = {"stale": f"main_ppo m2po_stale (k={STALE_K}, vLLM + FSDP)",
            "async": f"main_ppo {'m2po_separate_async' if gpus >= 2 else 'm2po_colocate_async'} (vLLM + FSDP)"}[kind]
    metrics_file = os.path.join(out_dir, f"{kind}.jsonl")
    log_file = os.path.join(out_dir, f"{kind}.log")
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", config_dir(), "--config-name",
               "m2po_trainer", *run_overrides(kind, gpus, paths, out_dir)]
    env = {**os.environ, "VERL_FILE_LOGGER_PATH": metrics_file}
    env.pop("VERL_PLATFORM", None)
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=RUN_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return Row(name, "FAIL", f"ran past {RUN_TIMEOUT_S} s; log: {log_file}")
    if code != 0:
        return Row(name, "FAIL", f"exit code {code}; log: {log_file}")
    steps = read_metrics(metrics_file)[0] if os.path.exists(metrics_file) else {}
    expected = STALE_STEPS if kind == "stale" else ASYNC_STEPS
    training = [s for s in range(1, expected + 1) if "actor/m2po/m2_before" in steps.get(s, {})]
    if len(training) != expected:
        return Row(name, "FAIL", f"M2PO's metrics at steps {training} of 1-{expected}; log: {log_file}")
    if kind == "stale":
        ledger = read_ledger(os.path.join(out_dir, kind, LEDGER_FILE))
        staleness = [ledger[s]["staleness_updates"] for s in sorted(ledger)]
        if staleness[-2:] != [STALE_K, STALE_K]:
            return Row(name, "FAIL", f"staleness per step {staleness}, expected {STALE_K} after the warm-up")
        return Row(name, "pass", f"{expected} steps, staleness per step {staleness}")
    return Row(name, "pass", f"{expected} steps with actor/m2po/* logged")


def run_gpu_check(stream=None, tests_dir: str | None = None, out_dir: str | None = None) -> int:
    """Print the table; 0 when nothing failed (skipped rows say why)."""
    import torch

    stream = stream or sys.stdout
    cuda = torch.cuda.is_available()
    rows = [registration_row(), *environment_rows(cuda), gpu_tests_row(cuda, tests_dir)]
    run_names = ("main_ppo m2po_stale (vLLM + FSDP)", "main_ppo asynchronous M2PO (vLLM + FSDP)")
    if not cuda:
        rows += [Row(name, "skip", "no CUDA device (on CPU: the CPU backend's runs in `make test`)") for name in run_names]
    elif any(r.status == "FAIL" for r in rows):
        rows += [Row(name, "skip", "fix the failures above first") for name in run_names]
    else:
        out_dir = out_dir or tempfile.mkdtemp(prefix="m2po-gpu-check-")
        paths = build_tiny_task(os.path.join(out_dir, "tiny"))
        gpus = torch.cuda.device_count()
        rows += [main_ppo_row("stale", gpus, paths, out_dir), main_ppo_row("async", gpus, paths, out_dir)]
    width = max(len(r.check) for r in rows)
    print(f"{'check'.ljust(width)} | result | detail", file=stream)
    print(f"{'-' * width}-|--------|-------", file=stream)
    for r in rows:
        print(f"{r.check.ljust(width)} | {r.status.ljust(6)} | {r.detail}", file=stream)
    failed = [r.check for r in rows if r.status == "FAIL"]
    skipped = [r.check for r in rows if r.status == "skip"]
    summary = f"FAIL: {', '.join(failed)}" if failed else "OK" + (f" ({len(skipped)} skipped)" if skipped else "")
    print(summary, file=stream)
    return 1 if failed else 0
