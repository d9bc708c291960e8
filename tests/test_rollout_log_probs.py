"""Where the loss reads the rollout engine's log-probs, they must be those of the distribution verl's
actor recomputes; verl's reading of `rollout_is_threshold`; rejection sampling and settings our
trainers would silently override are refused at start-up."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from verl.trainer.ppo.rollout_corr_helper import _parse_rollout_is_threshold

from m2po.configs import compose
from m2po.dry_run import main as dry_run_main
from m2po.verl_integration.behaviour_ratio import (
    UNTRUNCATED_IS_THRESHOLD,
    behaviour_ratio_errors,
    check_behaviour_ratio,
    parse_is_threshold,
    rejection_sampling_errors,
    rollout_log_prob_errors,
)

BYPASS_ASYNC = ["trainer.v1.trainer_mode=m2po_separate_async", "algorithm.rollout_correction.bypass_mode=true"]
STALE_ROLLOUT = ["m2po.stale.staleness_updates=8", "m2po.stale.behaviour_log_probs=rollout"]
DECOUPLED = ["trainer.v1.trainer_mode=m2po_separate_async", "actor_rollout_ref.actor.policy_loss.m2po_variant=decoupled",
             "algorithm.rollout_correction.rollout_is=token",
             f"algorithm.rollout_correction.rollout_is_threshold={UNTRUNCATED_IS_THRESHOLD}"]
WHERE = {"bypass": BYPASS_ASYNC, "stale@k, rollout log-probs": STALE_ROLLOUT, "decoupled weights": DECOUPLED}
BAD_SAMPLING = {
    "actor_rollout_ref.rollout.top_p=0.95": "actor_rollout_ref.rollout.top_p=0.95: the rollout's log-probs are then",
    "actor_rollout_ref.rollout.top_k=50": "actor_rollout_ref.rollout.top_k=50: the rollout's log-probs are then",
    "actor_rollout_ref.rollout.logprobs_mode=raw_logits": "logprobs_mode=raw_logits: logits are not log-probs",
    "actor_rollout_ref.rollout.logprobs_mode=processed_logits": "logprobs_mode=processed_logits: logits are not",
}


def config(*overrides):
    return compose("m2po_trainer", list(overrides))


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("bad", sorted(BAD_SAMPLING))
def test_sampling_that_changes_the_rollouts_log_probs_is_refused_where_the_loss_reads_them(where, bad):
    cfg = config(*WHERE[where], bad)
    assert behaviour_ratio_errors(cfg) == []  # the ratio itself is the right one...
    [error] = rollout_log_prob_errors(cfg)  # ...but the log-probs in it are not the policy's
    assert BAD_SAMPLING[bad] in error
    with pytest.raises(ValueError, match="the behaviour log-probs would not be what the trainer recomputes"):
        check_behaviour_ratio(cfg)


@pytest.mark.parametrize("where", sorted(WHERE))
def test_raw_log_probs_are_refused_only_with_a_temperature(where):
    raw = "actor_rollout_ref.rollout.logprobs_mode=raw_logprobs"
    assert rollout_log_prob_errors(config(*WHERE[where], raw)) == []
    [error] = rollout_log_prob_errors(config(*WHERE[where], raw, "actor_rollout_ref.rollout.temperature=0.6"))
    assert "logprobs_mode=raw_logprobs ignores actor_rollout_ref.rollout.temperature=0.6" in error


@pytest.mark.parametrize("where", sorted(WHERE))
def test_the_defaults_and_a_temperature_are_accepted(where):
    assert rollout_log_prob_errors(config(*WHERE[where])) == []
    assert rollout_log_prob_errors(config(*WHERE[where], "actor_rollout_ref.rollout.temperature=0.6")) == []


def test_where_the_trainer_recomputes_the_behaviour_log_probs_the_rollout_settings_are_not_in_the_loss():
    # stale@k with the actor's log-probs recorded at generation (the default)
    assert rollout_log_prob_errors(config("m2po.stale.staleness_updates=8", "actor_rollout_ref.rollout.top_p=0.9")) == []
    # verl's own loss and trainer with truncated-IS correction: verl's call, not ours
    assert rollout_log_prob_errors(config(
        "trainer.v1.trainer_mode=sync", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
        "algorithm.rollout_correction.rollout_is=token", "actor_rollout_ref.rollout.top_p=0.9")) == []


@given(st.one_of(
    st.floats(min_value=1e-3, max_value=1e12),
    st.integers(min_value=1, max_value=10**10),
    st.tuples(st.integers(1, 9), st.integers(10, 10**10)).map(lambda t: f"{t[0]}_{t[1]}"),
    st.floats(min_value=1e-3, max_value=1e6).map(lambda x: f" {x!r} "),
))
def test_the_threshold_is_read_as_verl_reads_it(spec):
    assert parse_is_threshold(spec) == _parse_rollout_is_threshold(spec)


def test_a_band_that_python_reads_as_one_number_is_refused_for_the_decoupled_weights():
    assert float("1_1000000000") == 11000000000.0  # what a float() check would have accepted
    assert parse_is_threshold("1_1000000000") == (1e9, 1.0)
    errors = behaviour_ratio_errors(config(*DECOUPLED[:-1], "algorithm.rollout_correction.rollout_is_threshold='1_1000000000'"))
    assert len(errors) == 1 and "rollout_is_threshold='1_1000000000'" in errors[0] and "must not be truncated or zeroed" in errors[0]


@pytest.mark.parametrize(("mode", "effect"), [
    (BYPASS_ASYNC, "verl ignores it in bypass mode"),
    (DECOUPLED, "it removes tokens from the response mask"),
    (["m2po.stale.staleness_updates=8"], "it removes tokens from the response mask"),
])
def test_rejection_sampling_is_refused_with_m2po(mode, effect):
    rs = ["algorithm.rollout_correction.rollout_rs=token_k1", "algorithm.rollout_correction.rollout_rs_threshold=2.0"]
    [error] = rejection_sampling_errors(config(*mode, *rs))
    assert error.startswith("algorithm.rollout_correction.rollout_rs='token_k1' with actor_rollout_ref.actor.policy_loss."
                            "loss_mode=m2po: ") and effect in error
    assert rejection_sampling_errors(config(*mode)) == []
    assert rejection_sampling_errors(config("trainer.v1.trainer_mode=sync", "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", *rs)) == []


@pytest.mark.parametrize("section", ["m2po_stale", "sync"])
def test_a_weight_sync_interval_the_stale_trainer_would_ignore_is_refused(section, capsys):
    code = dry_run_main(["--quiet", "llm=qwen2.5-math-7b", "method=m2po", "m2po.stale.staleness_updates=256",
                         f"+trainer.v1.{section}.parameter_sync_step=4"])
    assert code == 2
    assert (f"trainer.v1.{section}.parameter_sync_step=4: trainer.v1.trainer_mode=m2po_stale syncs the rollout's "
            "weights after every step (1) and would silently ignore it") in capsys.readouterr().err
