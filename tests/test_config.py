"""configs/m2po_trainer.yaml composed with hydra and checked by verl's own config code."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from m2po.configs import config_dir
from m2po.verl_integration.config import M2POPolicyLossConfig

REQUIRED = [
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
]


def _compose(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        return compose(config_name="m2po_trainer", overrides=[*REQUIRED, *overrides])


def _actor(cfg):
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_shipped_config_selects_grpo_and_m2po_and_validates():
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = _compose()
    assert cfg.algorithm.adv_estimator == "grpo"
    actor = _actor(cfg)
    assert isinstance(actor.policy_loss, M2POPolicyLossConfig)
    assert (actor.policy_loss.loss_mode, actor.policy_loss.m2_threshold, actor.policy_loss.m2po_variant) == (
        "m2po",
        0.04,
        "mask",
    )
    assert actor.loss_agg_mode == "token-mean" and not actor.use_kl_loss
    validate_config(cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def test_plain_overrides_compose():
    cfg = _compose(
        "actor_rollout_ref.actor.policy_loss.m2_threshold=0.02",
        "actor_rollout_ref.actor.policy_loss.m2po_variant=clip",
        "actor_rollout_ref.actor.policy_loss.loss_mode=no_trust_region",
    )
    policy_loss = _actor(cfg).policy_loss
    assert (policy_loss.m2_threshold, policy_loss.m2po_variant, policy_loss.loss_mode) == (0.02, "clip", "no_trust_region")


@pytest.mark.parametrize(
    "override, message",
    [
        ("actor_rollout_ref.actor.policy_loss.m2_threshold=-0.1", "actor_rollout_ref.actor.policy_loss.m2_threshold must be > 0"),
        ("actor_rollout_ref.actor.policy_loss.m2_threshold=0", "actor_rollout_ref.actor.policy_loss.m2_threshold must be > 0"),
        ("actor_rollout_ref.actor.policy_loss.m2_threshold=nan", "actor_rollout_ref.actor.policy_loss.m2_threshold must be > 0"),
        ("actor_rollout_ref.actor.policy_loss.m2po_variant=areal", r"m2po_variant must be one of \['mask', 'clip', 'decoupled'\]"),
    ],
)
def test_bad_values_fail_at_start_up_naming_the_key(override, message):
    cfg = _compose(override)
    with pytest.raises(Exception, match=message):
        _actor(cfg)


def test_typo_in_a_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="m2_treshold"):
        _compose("actor_rollout_ref.actor.policy_loss.m2_treshold=0.02")


def test_main_ppo_prints_the_composed_config_without_running():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", "pkg://m2po.configs",
         "--config-name", "m2po_trainer", "--cfg", "job", "actor_rollout_ref.actor.policy_loss.m2_threshold=0.02"],
        capture_output=True, text=True, env=env, cwd="/", timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "_target_: m2po.verl_integration.config.M2POPolicyLossConfig" in out.stdout
    assert "m2_threshold: 0.02" in out.stdout and "loss_mode: m2po" in out.stdout


def test_m2po_on_top_of_verls_own_config_with_plain_overrides():
    """Users with their own verl config switch with three overrides (README)."""
    from hydra import initialize_config_module

    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=[
                *REQUIRED,
                "actor_rollout_ref.actor.policy_loss._target_=m2po.verl_integration.config.M2POPolicyLossConfig",
                "actor_rollout_ref.actor.policy_loss.loss_mode=m2po",
                "+actor_rollout_ref.actor.policy_loss.m2_threshold=0.02",
            ],
        )
    policy_loss = _actor(cfg).policy_loss
    assert isinstance(policy_loss, M2POPolicyLossConfig)
    assert (policy_loss.loss_mode, policy_loss.m2_threshold, policy_loss.m2po_variant) == ("m2po", 0.02, "mask")


def test_shipped_defaults_are_the_code_defaults():
    """One default per setting: the YAML's tau and variant are the dataclass's, and tau is the one
    paper constant."""
    from m2po.algorithm import PAPER_M2_THRESHOLD

    policy_loss = _actor(_compose()).policy_loss
    assert policy_loss.m2_threshold == M2POPolicyLossConfig().m2_threshold == PAPER_M2_THRESHOLD == 0.04
    assert policy_loss.m2po_variant == M2POPolicyLossConfig().m2po_variant


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["actor_rollout_ref.actor.grad_clip=0.5"], "actor_rollout_ref.actor.grad_clip=0.5 is not read by verl 0.9.1's "
         r"trainer, which clips at actor_rollout_ref.actor.optim.clip_grad=1.0: set actor_rollout_ref.actor.optim.clip_grad=0.5"),
        (["critic.grad_clip=2.0"], r"critic.grad_clip=2.0 is not read .* set critic.optim.clip_grad=2.0"),
        (["actor_rollout_ref.actor.optim.clip_grad=0.5"], None),  # the key verl reads; grad_clip left at its default
        (["actor_rollout_ref.actor.grad_clip=0.5", "actor_rollout_ref.actor.optim.clip_grad=0.5"], None),  # they agree
    ],
)
def test_a_gradient_clip_verl_would_ignore_is_refused_by_name(overrides, refused):
    from m2po.verl_integration.startup_checks import check_m2po_config

    cfg = _compose(*overrides)
    if refused is None:
        check_m2po_config(cfg)
    else:
        with pytest.raises(ValueError, match=refused):
            check_m2po_config(cfg)
