"""`m2po check --gpu`: on CPU it runs what it can and says what it skipped; the GPU runs' configs pass
every start-up check here; on a GPU (marker `gpu`) the whole check must pass."""

from __future__ import annotations

import io
import os

import pytest
import torch
from omegaconf import OmegaConf

from m2po.cli import main as cli_main
from m2po.configs import compose
from m2po.dry_run import validate_experiment
from m2po.gpu_check import STALE_K, build_tiny_task, run_gpu_check, run_overrides


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    return build_tiny_task(str(tmp_path_factory.mktemp("gpu-check-task")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_on_cpu_it_checks_the_install_and_says_what_it_skipped(capsys):
    assert cli_main(["check", "--gpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("check "))  # after verl's own log lines
    rows = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in lines[header + 2:-1]}
    assert rows["plugin registered (m2po check)"][0] == "pass"
    assert rows["torch"] == ["pass", f"{torch.__version__} (CUDA build none)"]
    assert rows["CUDA device"] == ["skip", "torch.cuda.is_available() is False"]
    assert rows["pytest -m gpu"] == ["skip", "no CUDA device"]
    for run in ("main_ppo m2po_stale (vLLM + FSDP)", "main_ppo asynchronous M2PO (vLLM + FSDP)"):
        assert rows[run][0] == "skip" and "no CUDA device" in rows[run][1]
    assert lines[-1] == "OK (4 skipped)"


@pytest.mark.parametrize(("kind", "gpus", "mode", "train_gpus"), [
    ("stale", 1, "m2po_stale", 1), ("stale", 8, "m2po_stale", 8),
    ("async", 1, "m2po_colocate_async", 1), ("async", 8, "m2po_separate_async", 4),
])
def test_the_gpu_runs_pass_every_start_up_check(kind, gpus, mode, train_gpus, tiny_task, tmp_path):
    config = compose("m2po_trainer", run_overrides(kind, gpus, tiny_task, str(tmp_path)))
    resolved = validate_experiment(config)  # verl's validate_config and ours, as main_ppo's driver runs them
    assert resolved["trainer"]["v1"]["trainer_mode"] == mode
    assert resolved["trainer"]["n_gpus_per_node"] == train_gpus
    assert resolved["actor_rollout_ref"]["rollout"]["name"] == "vllm"
    assert resolved["m2po"]["stale"]["staleness_updates"] == (STALE_K if kind == "stale" else 0)
    if mode == "m2po_separate_async":
        assert resolved["actor_rollout_ref"]["rollout"]["n_gpus_per_node"] == 4
        assert resolved["actor_rollout_ref"]["rollout"]["checkpoint_engine"]["backend"] == "nccl"
    else:
        assert resolved["algorithm"]["rollout_correction"]["bypass_mode"] == (kind == "async")


def test_the_tiny_model_has_a_head_size_gpu_kernels_take(tiny_task):
    config = OmegaConf.load(os.path.join(tiny_task["model"], "config.json"))
    assert config.hidden_size // config.num_attention_heads == 64
    assert {"tokenizer.json", "model.safetensors", "config.json"} <= set(os.listdir(tiny_task["model"]))


def test_an_unknown_run_kind_is_refused(tiny_task, tmp_path):
    with pytest.raises(ValueError, match="kind must be 'stale' or 'async'"):
        run_overrides("sync", 1, tiny_task, str(tmp_path))


@pytest.mark.gpu
def test_the_whole_check_passes_on_a_gpu(tmp_path):
    out = io.StringIO()
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = run_gpu_check(stream=out, tests_dir=tests_dir, out_dir=str(tmp_path))
    assert code == 0, out.getvalue()
    assert "| skip" not in out.getvalue().split("pytest -m gpu")[1], out.getvalue()
