"""Which importance ratio reaches the loss in each trainer mode, and the refusals at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from m2po.configs import compose as compose_config
from m2po.dry_run import main as dry_run_main, validate_experiment
from m2po.configs import config_dir
from m2po.verl_integration.behaviour_ratio import UNTRUNCATED_IS_THRESHOLD, behaviour_ratio_errors
from m2po.verl_integration.trainer_modes import ASYNC_MODES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYPASS = ["algorithm.rollout_correction.bypass_mode=true", "actor_rollout_ref.rollout.calculate_log_probs=true"]
DECOUPLED_WEIGHTS = [
    "algorithm.rollout_correction.bypass_mode=false",
    "algorithm.rollout_correction.rollout_is=token",
    f"algorithm.rollout_correction.rollout_is_threshold={UNTRUNCATED_IS_THRESHOLD}",
]


def _errors(*overrides: str) -> list[str]:
    return behaviour_ratio_errors(compose_config("m2po_trainer", list(overrides)))


def _mode(mode: str) -> list[str]:
    return [f"trainer.v1.trainer_mode={mode}"]


@pytest.mark.parametrize("mode", ASYNC_MODES)
@pytest.mark.parametrize("loss", ["m2po", "no_trust_region", "vanilla"])
def test_async_decoupled_mode_without_weights_is_refused_for_every_loss(mode, loss):
    """verl's default in an async trainer: old_log_prob is the snapshot and nothing carries the gap."""
    errors = _errors(*_mode(mode), f"actor_rollout_ref.actor.policy_loss.loss_mode={loss}")
    assert len(errors) == 1
    assert f"trainer.v1.trainer_mode={mode} and algorithm.rollout_correction.bypass_mode=false" in errors[0]
    assert "pi_theta / pi_snapshot" in errors[0] and "bypass_mode=true" in errors[0]


@pytest.mark.parametrize("mode", ASYNC_MODES)
@pytest.mark.parametrize("loss", ["m2po", "no_trust_region", "vanilla"])
def test_bypass_mode_puts_the_behaviour_log_probs_in_the_loss(mode, loss):
    assert _errors(*_mode(mode), *BYPASS, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss}") == []


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_decoupled_variant_with_exact_token_weights_is_accepted(mode):
    assert _errors(*_mode(mode), *DECOUPLED_WEIGHTS, "actor_rollout_ref.actor.policy_loss.m2po_variant=decoupled") == []
    # ...and so are no_trust_region (w * r_prox = r_behav) and decoupled PPO with any IS weights
    assert _errors(*_mode(mode), *DECOUPLED_WEIGHTS, "actor_rollout_ref.actor.policy_loss.loss_mode=no_trust_region") == []
    assert _errors(
        *_mode(mode), "algorithm.rollout_correction.rollout_is=sequence", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"
    ) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.rollout_correction.rollout_is=sequence", "rollout_is='sequence': m2po_variant=decoupled needs per-token"),
        ("algorithm.rollout_correction.rollout_is_threshold=2.0", "rollout_is_threshold=2.0: m2po_variant=decoupled reads"),
        ("algorithm.rollout_correction.rollout_is_threshold='0.5_5.0'", "rollout_is_threshold='0.5_5.0'"),
        ("algorithm.rollout_correction.rollout_is_batch_normalize=true", "rollout_is_batch_normalize=true rescales"),
        ("algorithm.rollout_correction.bypass_mode=true", "needs the recomputed proximal one (bypass_mode=false)"),
        ("actor_rollout_ref.rollout.calculate_log_probs=false", "calculate_log_probs=false: m2po_variant=decoupled"),
    ],
)
def test_decoupled_variant_refuses_what_would_corrupt_the_weights(override, message):
    errors = _errors(*_mode("separate_async"), *DECOUPLED_WEIGHTS, "actor_rollout_ref.actor.policy_loss.m2po_variant=decoupled", override)
    assert any(message in error for error in errors), errors


@pytest.mark.parametrize("mode", ["sync", "m2po_stale"])
@pytest.mark.parametrize("loss", ["m2po_variant=decoupled", "loss_mode=decoupled_ppo"])
def test_decoupled_losses_need_a_proximal_policy(mode, loss):
    (error,) = _errors(*_mode(mode), f"actor_rollout_ref.actor.policy_loss.{loss}")
    assert f"{loss} needs a proximal policy: an asynchronous trainer" in error and repr(mode) in error
    assert "m2po.stale.recompute_proximal=true" in error


RECOMPUTE = [*_mode("m2po_stale"), "m2po.stale.recompute_proximal=true"]


@pytest.mark.parametrize("loss", ["m2po_variant=decoupled", "loss_mode=decoupled_ppo"])
def test_stale_trainer_recomputing_the_proximal_policy_runs_the_decoupled_losses(loss):
    assert _errors(*RECOMPUTE, *DECOUPLED_WEIGHTS, f"actor_rollout_ref.actor.policy_loss.{loss}") == []
    errors = _errors(*RECOMPUTE, f"actor_rollout_ref.actor.policy_loss.{loss}")  # verl's defaults: no weights
    assert any(f"rollout_is=None: {loss} needs per-token weights" in error for error in errors), errors


@pytest.mark.parametrize("loss", ["m2po", "no_trust_region", "vanilla"])
def test_stale_trainer_recomputing_the_proximal_policy_refuses_what_drops_the_gap(loss):
    (error,) = _errors(*RECOMPUTE, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss}")
    assert "m2po.stale.recompute_proximal=true, old_log_prob is recomputed by the current actor" in error
    assert "set m2po.stale.recompute_proximal=false" in error
    # with the weights: PPO with IS weights and no_trust_region (w * r_prox = r_behav) are fine; the
    # paper's M2PO never is (it would bound pi_theta / pi_prox)
    weighted = _errors(*RECOMPUTE, *DECOUPLED_WEIGHTS, f"actor_rollout_ref.actor.policy_loss.loss_mode={loss}")
    assert (weighted != []) == (loss == "m2po")


def test_sync_trainers_are_untouched_and_bypass_needs_rollout_log_probs():
    assert _errors() == [] and _errors(*_mode("sync")) == []
    (error,) = _errors(*_mode("sync"), "algorithm.rollout_correction.bypass_mode=true", "actor_rollout_ref.rollout.calculate_log_probs=false")
    assert "bypass_mode=true needs actor_rollout_ref.rollout.calculate_log_probs=true" in error


SCRIPT_OVERRIDES = {
    "m2po_separate_async.sh": ["llm=qwen2.5-math-7b", "method=m2po", "+async=separate"],
    "grpo_separate_async.sh": ["llm=qwen2.5-math-7b", "method=grpo", "+async=separate"],
    "m2po_decoupled_separate_async.sh": ["llm=qwen2.5-math-7b", "method=m2po", "+async=separate_decoupled"],
}


def test_every_async_script_is_covered_here():
    scripts = {name for name in os.listdir(os.path.join(REPO, "train-scripts", "async")) if name.endswith(".sh")}
    assert scripts == set(SCRIPT_OVERRIDES)
    for script, overrides in SCRIPT_OVERRIDES.items():
        with open(os.path.join(REPO, "train-scripts", "async", script)) as f:
            assert f"launch {' '.join(overrides)} \"$@\"" in f.read(), script


@pytest.mark.parametrize("script", sorted(SCRIPT_OVERRIDES))
def test_async_scripts_put_behaviour_log_probs_into_the_loss(script):
    config = validate_experiment(compose_config("m2po_paper", SCRIPT_OVERRIDES[script]))
    correction = config["algorithm"]["rollout_correction"]
    rollout = config["actor_rollout_ref"]["rollout"]
    policy_loss = config["actor_rollout_ref"]["actor"]["policy_loss"]
    assert config["trainer"]["v1"]["trainer_mode"] == "m2po_separate_async" and rollout["calculate_log_probs"]
    if "decoupled" in script:  # old_log_prob = pi_prox; the weights carry pi_prox / pi_behav exactly
        assert not correction["bypass_mode"] and correction["rollout_is"] == "token"
        assert float(correction["rollout_is_threshold"]) >= UNTRUNCATED_IS_THRESHOLD
        assert not correction["rollout_is_batch_normalize"] and policy_loss["m2po_variant"] == "decoupled"
    else:  # old_log_prob = the rollout engine's log-prob at generation time
        assert correction["bypass_mode"] and policy_loss["m2po_variant"] == "mask"
    # one 8-GPU node by default: 4 train + 4 serve the rollout; +async_layout=two_nodes for 8 + 8
    assert (config["trainer"]["nnodes"], config["trainer"]["n_gpus_per_node"]) == (1, 4)
    assert (rollout["nnodes"], rollout["n_gpus_per_node"]) == (1, 4)
    assert not config["actor_rollout_ref"]["hybrid_engine"] and rollout["checkpoint_engine"]["backend"] == "nccl"
    assert config["trainer"]["v1"]["sampler"]["max_off_policy_threshold"] * 4 == 256  # versions x updates
    two = validate_experiment(compose_config("m2po_paper", [*SCRIPT_OVERRIDES[script], "+async_layout=two_nodes"]))
    assert (two["trainer"]["n_gpus_per_node"], two["actor_rollout_ref"]["rollout"]["n_gpus_per_node"]) == (8, 8)


def test_misconfigured_async_m2po_fails_the_dry_run_by_name(capsys):
    argv = [*SCRIPT_OVERRIDES["m2po_separate_async.sh"], "algorithm.rollout_correction.bypass_mode=false"]
    assert dry_run_main(["--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert "loss_mode=m2po (m2po_variant=mask)" in err and "set algorithm.rollout_correction.bypass_mode=true" in err


def test_verls_own_main_ppo_refuses_it_before_starting_ray(tmp_path):
    """A user's own verl run (our losses, verl's plain separate_async, verl's default decoupled mode):
    the plugin's check inside verl's validate_config stops the driver, naming the keys, within seconds."""
    command = [
        sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", config_dir(), "--config-name", "m2po_trainer",
        "trainer.v1.trainer_mode=separate_async",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VERL_PLATFORM")}
    start = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "the policy loss would not see the ratio to the behaviour policy" in result.stderr
    assert "trainer.v1.trainer_mode=separate_async and algorithm.rollout_correction.bypass_mode=false" in result.stderr
    assert "ray init kwargs" not in result.stdout  # refused in the driver, before Ray started
    assert time.monotonic() - start < 120
