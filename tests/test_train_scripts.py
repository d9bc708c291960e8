"""Every training script's dry run: the bash plumbing (which interpreter call each script makes)
and the complete composed config validated by verl's and our start-up checks, on CPU."""

from __future__ import annotations

import glob
import os
import shlex
import subprocess
import sys

import pytest

from m2po.configs import compose as compose_config
from m2po.dry_run import main as dry_run_main, validate_experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(REPO, "train-scripts")
HELPERS = {"launch.sh", "generate_datasets.sh", "run_m2po.sh", "run_all.sh"}
EXPERIMENT_SCRIPTS = sorted(
    os.path.relpath(path, SCRIPTS_DIR)
    for path in glob.glob(os.path.join(SCRIPTS_DIR, "**", "*.sh"), recursive=True)
    if os.path.basename(path) not in HELPERS
)


def _python_call(script: str, *args: str, tmp_path) -> list[str]:
    """The interpreter arguments the script's launcher passes (a recorder stands in for python)."""
    record = tmp_path / "argv"
    recorder = tmp_path / "python"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    recorder.chmod(0o755)
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, script), *args],
        env={**os.environ, "PYTHON": str(recorder)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return record.read_text().splitlines()


MODELS = ("llama3.2-3b-instruct", "qwen2.5-math-7b", "qwen3-base-1.7b", "qwen3-base-4b", "qwen3-base-8b", "qwen2.5-32b")
TAU_ABLATION = (0.005, 0.01, 0.02, 0.08, 0.16)  # and 0.04, each model's m2po_s256.sh


def test_the_expected_experiments_exist():
    expected = {f"{llm}/{s}.sh" for llm in MODELS for s in ("grpo_s0", "grpo_s256", "gspo_s256", "m2po_s256")}
    expected |= {f"qwen2.5-math-7b/{s}.sh" for s in ("grpo_s8", "m2po_s0", "m2po_s8")}
    # the other off-policy baselines at s=256: TOPR, GPPO and AReaL's decoupled PPO (ours), CISPO (verl's)
    expected |= {f"qwen2.5-math-7b/{s}_s256.sh" for s in ("topr", "gppo", "decoupled_ppo", "cispo")}
    # GRPO without trust region at s=256 (the paper's collapse figures)
    expected |= {f"{llm}/grpo_no_tr_s256.sh" for llm in ("llama3.2-3b-instruct", "qwen2.5-math-7b", "qwen2.5-32b")}
    expected |= {f"staleness-sweep/{m}_s{s}.sh" for m in ("grpo", "m2po") for s in (32, 64, 128)}
    expected |= {f"tau-ablation/{llm}_m2po_tau{tau}_s256.sh" for llm in ("llama3.2-3b-instruct", "qwen2.5-math-7b")
                 for tau in TAU_ABLATION}
    expected |= {f"async/{s}_separate_async.sh" for s in ("m2po", "m2po_decoupled", "grpo")}
    assert set(EXPERIMENT_SCRIPTS) == expected


@pytest.mark.parametrize("llm", MODELS)
def test_gspo_runs_at_its_papers_settings(llm, tmp_path):
    config = _resolved(f"{llm}/gspo_s256.sh", tmp_path)
    actor = config["actor_rollout_ref"]["actor"]
    assert actor["policy_loss"]["loss_mode"] == "gspo"
    assert (actor["clip_ratio_low"], actor["clip_ratio_high"]) == (3e-4, 4e-4)
    assert actor["loss_agg_mode"] == "seq-mean-token-mean"
    assert config["m2po"]["stale"]["staleness_updates"] == 256
    # Everything but the loss is the GRPO s=256 run's.
    grpo = _resolved(f"{llm}/grpo_s256.sh", tmp_path)
    assert _diff(grpo, config) == [
        "actor_rollout_ref.actor.clip_ratio_high", "actor_rollout_ref.actor.clip_ratio_low",
        "actor_rollout_ref.actor.loss_agg_mode", "actor_rollout_ref.actor.policy_loss.loss_mode",
        "actor_rollout_ref.rollout.trace.experiment_name",
        "critic.loss_agg_mode",  # verl interpolates the actor's (no critic runs with GRPO advantages)
        "m2po.experiment.method", "trainer.default_local_dir", "trainer.experiment_name",
    ]


RUN_NAME_KEYS = [
    "actor_rollout_ref.rollout.trace.experiment_name", "m2po.experiment.method", "trainer.default_local_dir",
    "trainer.experiment_name",
]


def test_gppo_and_decoupled_ppo_change_only_their_loss_against_grpo_s256(tmp_path):
    grpo = _resolved("qwen2.5-math-7b/grpo_s256.sh", tmp_path)
    gppo = _resolved("qwen2.5-math-7b/gppo_s256.sh", tmp_path)
    assert _diff(grpo, gppo) == sorted([
        "actor_rollout_ref.actor.clip_ratio_c", "actor_rollout_ref.actor.clip_ratio_high",
        "actor_rollout_ref.actor.policy_loss.loss_mode", *RUN_NAME_KEYS,
    ])
    decoupled = _resolved("qwen2.5-math-7b/decoupled_ppo_s256.sh", tmp_path)
    assert _diff(grpo, decoupled) == sorted([
        "actor_rollout_ref.actor.policy_loss.behaviour_weight_cap", "actor_rollout_ref.actor.policy_loss.loss_mode",
        "algorithm.rollout_correction.rollout_is", "algorithm.rollout_correction.rollout_is_threshold",
        "m2po.stale.recompute_proximal", *RUN_NAME_KEYS,
    ])


@pytest.mark.parametrize("llm", ["llama3.2-3b-instruct", "qwen2.5-math-7b"])
def test_tau_ablation_changes_only_tau(llm, tmp_path):
    main = _resolved(f"{llm}/m2po_s256.sh", tmp_path)
    for tau in TAU_ABLATION:
        config = _resolved(f"tau-ablation/{llm}_m2po_tau{tau}_s256.sh", tmp_path)
        assert config["actor_rollout_ref"]["actor"]["policy_loss"]["m2_threshold"] == tau
        assert config["trainer"]["experiment_name"] == f"{llm}-m2po_tau{tau}-s256"
        assert _diff(main, config) == [
            "actor_rollout_ref.actor.policy_loss.m2_threshold", "actor_rollout_ref.rollout.trace.experiment_name",
            "m2po.experiment.method", "trainer.default_local_dir", "trainer.experiment_name",
        ]
    with open(os.path.join(SCRIPTS_DIR, "tau-ablation", "run_all.sh")) as f:
        run_all = f.read()
    assert "0.005 0.01 0.02 0.04 0.08 0.16" in run_all


@pytest.mark.parametrize("script", EXPERIMENT_SCRIPTS)
def test_dry_run_composes_and_validates(script, tmp_path, capsys):
    argv = _python_call(script, "--dry-run", "actor_rollout_ref.model.path=/models/x", "trainer.nnodes=2", tmp_path=tmp_path)
    assert argv[:4] == ["-m", "m2po.dry_run", "--config-name", "m2po_paper"]
    assert argv[-2:] == ["actor_rollout_ref.model.path=/models/x", "trainer.nnodes=2"]  # command line wins
    assert dry_run_main(argv[2:]) == 0, capsys.readouterr().err
    printed = capsys.readouterr()
    assert "path: /models/x" in printed.out and "nnodes: 2" in printed.out
    assert "dry run OK" in printed.err


def test_scripts_launch_verls_main_ppo_with_the_paper_config(tmp_path):
    argv = _python_call("qwen2.5-math-7b/m2po_s256.sh", tmp_path=tmp_path)
    # first call: `m2po config-dir`; the recorded (last) call is verl's trainer
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"] and argv[4:6] == ["--config-name", "m2po_paper"]
    assert argv[6:] == ["llm=qwen2.5-math-7b", "method=m2po", "m2po.stale.staleness_updates=256"]


def _resolved(script: str, tmp_path) -> dict:
    argv = _python_call(script, "--dry-run", tmp_path=tmp_path)
    return validate_experiment(compose_config("m2po_paper", argv[4:]))


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def test_grpo_and_m2po_at_s256_differ_only_in_the_loss(tmp_path):
    grpo = _resolved("qwen2.5-math-7b/grpo_s256.sh", tmp_path)
    m2po = _resolved("qwen2.5-math-7b/m2po_s256.sh", tmp_path)
    assert _diff(grpo, m2po) == [
        "actor_rollout_ref.actor.policy_loss.loss_mode",
        "actor_rollout_ref.rollout.trace.experiment_name",  # verl interpolates the run name
        "m2po.experiment.method",
        "trainer.default_local_dir",  # named after the experiment
        "trainer.experiment_name",
    ]


def test_paper_settings_reach_the_config(tmp_path):
    cfg = _resolved("qwen2.5-math-7b/m2po_s256.sh", tmp_path)
    actor, rollout = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
    assert cfg["data"]["train_batch_size"] == 256 and actor["ppo_mini_batch_size"] == 64 and rollout["n"] == 8
    assert actor["optim"]["lr"] == 1e-6 and actor["optim"]["weight_decay"] == 0.01 and actor["optim"]["clip_grad"] == 1.0
    assert actor["loss_agg_mode"] == "token-mean" and not actor["use_kl_loss"] and rollout["temperature"] == 1.0
    assert (cfg["data"]["max_prompt_length"], cfg["data"]["max_response_length"]) == (1536, 2560)
    assert actor["policy_loss"]["m2_threshold"] == 0.04 and actor["policy_loss"]["m2po_variant"] == "mask"
    assert cfg["trainer"]["v1"]["trainer_mode"] == "m2po_stale" and cfg["m2po"]["stale"]["staleness_updates"] == 256
    assert cfg["reward"]["custom_reward_function"]["path"] == "pkg://m2po.reward.math_reward"
    assert rollout["val_kwargs"]["n"] == 4 and any("aime24x4" in f for f in cfg["data"]["val_files"])
    llama = _resolved("llama3.2-3b-instruct/m2po_s256.sh", tmp_path)
    assert llama["data"]["max_prompt_length"] + llama["data"]["max_response_length"] == 16384
    big = _resolved("qwen2.5-32b/m2po_s256.sh", tmp_path)
    assert big["trainer"]["nnodes"] == 4
    async_run = _resolved("async/m2po_separate_async.sh", tmp_path)
    assert async_run["trainer"]["v1"]["trainer_mode"] == "m2po_separate_async"
    assert async_run["trainer"]["v1"]["sampler"]["max_off_policy_threshold"] * 4 >= 64


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("m2po.stale.staleness_updates=6", "not a multiple of the 4 model updates"),
        ("m2po.stale.warmup=lazy", "m2po.stale.warmup must be one of"),
        ("trainer.v1.trainer_mode=sync", "needs verl's v1 trainer in our mode"),
        ("actor_rollout_ref.actor.policy_loss.m2_threshold=-1", "m2_threshold must be > 0"),
        ("m2po.stale.behaviour_log_probs=vllm", "behaviour_log_probs must be one of"),
        ("algorithm.rollout_correction.bypass_mode=true", "behaviour_log_probs=rollout"),
    ],
)
def test_bad_settings_fail_the_dry_run_naming_the_key(override, message, capsys):
    argv = ["llm=qwen2.5-math-7b", "method=m2po", "m2po.stale.staleness_updates=256", override]
    assert dry_run_main(["--quiet", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_option_is_refused(tmp_path):
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, "qwen2.5-math-7b/m2po_s0.sh"), "--cpu"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "unknown option --cpu" in result.stderr


def test_one_real_dry_run_end_to_end():
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, "qwen3-base-8b/grpo_s256.sh"), "--dry-run"],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run OK: qwen3-base-8b-grpo-s256 (loss_mode=vanilla, staleness=256 updates" in result.stderr
    assert "path: Qwen/Qwen3-8B-Base" in result.stdout
