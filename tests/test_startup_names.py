"""First contact: the names verl resolves only after start-up are checked before it, and the dry run
answers a config mistake with one line that names the key (and the nearest one), never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import verl
from hypothesis import given, strategies as st

from m2po.configs import compose, config_dir
from m2po.dry_run import main as dry_run_main
from m2po.verl_integration.late_names import (
    VERL_ROLLOUTS,
    VERL_TRAINER_MODES,
    custom_reward_errors,
    edit_distance,
    late_name_errors,
    nearest,
    registered_policy_losses,
    registered_rollouts,
    registered_trainers,
    top_level_names,
)
from m2po.verl_integration.startup_checks import entry_point_errors, looks_local
from m2po.verl_integration.trainer_modes import LOSS_MODES, OUR_TRAINER_MODES

PAPER = ["llm=qwen2.5-math-7b", "method=m2po", "m2po.stale.staleness_updates=256"]


def paper_config(*overrides):
    return compose("m2po_paper", [*PAPER, *overrides])


def dry_run(capsys, *overrides):
    code = dry_run_main(["--quiet", *PAPER, *overrides])
    captured = capsys.readouterr()
    return code, captured.err


def test_the_shipped_config_has_no_late_name_error():
    assert late_name_errors(paper_config()) == []


def test_the_names_accepted_without_a_registry_lookup_are_registered_in_verl():
    assert set(VERL_TRAINER_MODES) | set(OUR_TRAINER_MODES) <= registered_trainers()
    assert set(VERL_ROLLOUTS) <= registered_rollouts()
    assert set(LOSS_MODES) <= registered_policy_losses()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("actor_rollout_ref.actor.policy_loss.loss_mode=m2p0",
         "actor_rollout_ref.actor.policy_loss.loss_mode='m2p0' is not a name verl 0.9.1 knows (did you mean 'm2po'?); allowed: "),
        ("algorithm.adv_estimator=grpoo", "algorithm.adv_estimator='grpoo' is not a name verl 0.9.1 knows (did you mean 'grpo'?)"),
        ("trainer.v1.trainer_mode=m2po_stal", "trainer.v1.trainer_mode='m2po_stal' is not a name verl 0.9.1 knows (did you mean 'm2po_stale'?)"),
        ("actor_rollout_ref.rollout.name=vlm", "actor_rollout_ref.rollout.name='vlm' is not a name verl 0.9.1 knows (did you mean 'vllm'?)"),
        ("reward.custom_reward_function.name=compute_scor",
         "reward.custom_reward_function.name='compute_scor' is not defined in "),
        ("reward.custom_reward_function.path=rewards/mine.py",
         "reward.custom_reward_function.path='rewards/mine.py' is a file that does not exist"),
        ("reward.custom_reward_function.path=pkg://m2po.reward.math_rewards",
         "reward.custom_reward_function.path='pkg://m2po.reward.math_rewards' is a module that cannot be found"),
    ],
)
def test_a_late_name_fails_the_dry_run_in_one_line(override, expected, capsys):
    code, err = dry_run(capsys, override)
    assert code == 2
    [line] = [line for line in err.splitlines() if line.startswith("config error:")]
    assert expected in line
    assert "Traceback" not in err and "passed" not in err


def test_the_allowed_policy_losses_are_listed():
    [error] = late_name_errors(paper_config("actor_rollout_ref.actor.policy_loss.loss_mode=m2p0"))
    listed = error.split("allowed: ")[1].split(", ")
    assert listed == sorted(registered_policy_losses()) and "m2po" in listed and "vanilla" in listed


def test_a_custom_reward_function_is_found_by_name_without_running_its_file(tmp_path):
    reward = tmp_path / "reward.py"
    reward.write_text("raise SystemExit('never executed')\nimport math as m\n\ndef score(data_source, solution_str, "
                      "ground_truth, extra_info=None):\n    return 1.0\n\nalias = score\n")
    config = paper_config(f"reward.custom_reward_function.path={reward}", "reward.custom_reward_function.name=alias")
    assert custom_reward_errors(config) == []
    config = paper_config(f"reward.custom_reward_function.path=file://{reward}", "reward.custom_reward_function.name=scores")
    [error] = custom_reward_errors(config)
    assert f"reward.custom_reward_function.name='scores' is not defined in {reward} (did you mean 'score'?); " \
           "it defines: alias, m, score" == error


def test_a_module_whose_names_cannot_be_read_statically_is_not_refused():
    assert top_level_names("from os.path import *\n") is None
    assert top_level_names("def __getattr__(name):\n    return 1\n") is None
    assert top_level_names("try:\n    import x\nexcept ImportError:\n    x = None\n") is None
    assert top_level_names("a, (b, c) = 1, (2, 3)\nd: int = 4\nclass E: pass\nasync def f(): pass\nimport g.h\n") == {
        "a", "b", "c", "d", "E", "f", "g"}


@given(st.sampled_from(sorted(LOSS_MODES)), st.integers(0, 5))
def test_a_one_letter_typo_of_a_loss_gets_a_suggestion_one_letter_away(name, position):
    position = min(position, len(name) - 1)
    typo = name[:position] + ("x" if name[position] != "x" else "y") + name[position + 1:]
    suggestion = nearest(typo, registered_policy_losses())  # the name itself, or as near (gxpo: gppo or gspo)
    assert len(suggestion) == len(typo) and sum(a != b for a, b in zip(suggestion, typo)) == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("actor_rollout_ref.actor.policy_loss.m2_treshold=0.05",
         "config error: actor_rollout_ref.actor.policy_loss.m2_treshold is not a key of the composed config (did you "
         "mean 'actor_rollout_ref.actor.policy_loss.m2_threshold'?); to add a new key, write "
         "+actor_rollout_ref.actor.policy_loss.m2_treshold=<value>"),
        ("actor_rollout_ref.actr.ppo_epochs=2",
         "config error: actor_rollout_ref.actr.ppo_epochs is not a key of the composed config (did you mean "
         "'actor_rollout_ref.actor.ppo_epochs'?); to add a new key, write +actor_rollout_ref.actr.ppo_epochs=<value>"),
        ("m2po.stale.staleness_updates=many",
         "config error: ValueError: m2po.stale.staleness_updates: Value 'many' of type 'str' could not be converted "
         "to Integer"),
        ("+m2po.stale.stalenes_updates=8",
         "config error: ValueError: m2po.stale.stalenes_updates: Key 'stalenes_updates' not in 'StaleSectionConfig' "
         "(did you mean 'staleness_updates'?)"),
    ],
)
def test_a_misspelled_key_or_a_wrong_type_is_one_line_naming_the_full_key(override, expected, capsys):
    code, err = dry_run(capsys, override)
    assert code == 2
    assert err.strip().splitlines()[-1] == expected
    assert "Traceback" not in err and "passed" not in err


def test_a_group_option_that_does_not_exist_lists_the_options(capsys):
    code = dry_run_main(["--quiet", "llm=qwen9", "method=m2po"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip() == ("config error: In 'm2po_paper': Could not find 'llm/qwen9' Available options in 'llm': "
                           "llama3.2-3b-instruct qwen2.5-32b qwen2.5-math-7b qwen3-base-1.7b qwen3-base-4b qwen3-base-8b")


def test_missing_data_a_missing_local_model_and_no_file_logger_are_warned(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.parquet").write_bytes(b"")
    code, err = dry_run(capsys, f"data.train_files={tmp_path / 'train.parquet'}", "data.val_files=[val.parquet,gone.parquet]",
                        "actor_rollout_ref.model.path=./models/qwen", "trainer.logger=[console]")
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: data.val_files: 2 of 2 file(s) not found from {tmp_path}: val.parquet, gone.parquet (bash "
        "train-scripts/generate_datasets.sh writes the paper's datasets)",
        "warning: actor_rollout_ref.model.path: ./models/qwen looks like a local path and does not exist",
        "warning: trainer.logger=['console'] has no 'file': `m2po report` reads the metrics verl's file logger "
        "writes (add trainer.logger=[console,file,...])",
    ]
    assert err.index("warning:") < err.index("dry run OK")


def test_a_hub_id_is_not_a_local_path():
    assert not looks_local("Qwen/Qwen2.5-Math-7B") and not looks_local("gpt2")
    assert all(looks_local(p) for p in ("/models/x", "./x", "../x", "~/x", "models/org/x"))


def test_the_async_summary_states_the_staleness_bound(capsys):
    assert dry_run_main(["--quiet", "llm=qwen2.5-math-7b", "method=m2po", "+async=separate"]) == 0
    err = capsys.readouterr().err
    assert ("staleness up to about 256 updates (trainer.v1.sampler.max_off_policy_threshold=64 versions x "
            "trainer.v1.separate_async.parameter_sync_step=4)") in err
    assert "staleness=0 updates" not in err


def test_verls_own_main_ppo_refuses_a_misspelled_loss_before_starting_ray(tmp_path):
    """The typo that would otherwise surface at the first actor update, after the warm-up."""
    command = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", config_dir(), "--config-name",
               "m2po_trainer", "actor_rollout_ref.actor.policy_loss.loss_mode=m2p0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VERL_PLATFORM")}
    start = time.monotonic()
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "actor_rollout_ref.actor.policy_loss.loss_mode='m2p0' is not a name verl 0.9.1 knows (did you mean 'm2po'?)" \
        in result.stderr
    assert "ray init kwargs" not in result.stdout and "passed successfully" not in result.stdout
    assert time.monotonic() - start < 120


@given(st.text("abc", max_size=6), st.text("abc", max_size=6), st.text("abc", max_size=6))
def test_edit_distance_is_a_metric_with_single_edits_costing_one(a, b, c):
    assert edit_distance(a, a) == 0 and edit_distance(a, b) == edit_distance(b, a)
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert edit_distance(a, a + "x") == 1 and edit_distance("x" + a, a) == 1
    assert abs(len(a) - len(b)) <= edit_distance(a, b) <= max(len(a), len(b))


@pytest.mark.parametrize(
    ("module", "cwd"),
    [
        ("verl.experimental.fully_async_policy.fully_async_main", None),  # never calls validate_config
        # its config searches verl's own relative to the working directory
        ("verl.experimental.one_step_off_policy.main_ppo", os.path.dirname(os.path.dirname(verl.__file__))),
    ],
)
def test_verls_experimental_off_policy_entry_points_refuse_our_losses_before_ray_starts(module, cwd, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VERL_PLATFORM")}
    command = [sys.executable, "-m", module, "actor_rollout_ref.actor.policy_loss.loss_mode=m2po",
               f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=cwd or tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    entry = module.rsplit(".", 1)[0]
    assert f"actor_rollout_ref.actor.policy_loss.loss_mode=m2po is not supported under {entry}" in result.stderr
    assert "ray init kwargs" not in result.stdout and "Started a local Ray instance" not in result.stderr


def test_the_entry_point_check_leaves_verls_losses_and_main_ppo_alone():
    from verl.experimental.fully_async_policy.fully_async_main import FullyAsyncTaskRunner
    from verl.trainer.main_ppo import TaskRunnerV1

    config = compose("m2po_trainer", ["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"])
    assert entry_point_errors(config, FullyAsyncTaskRunner) == []
    config = compose("m2po_trainer", [])
    assert entry_point_errors(config, TaskRunnerV1) == []
    [error] = entry_point_errors(config, FullyAsyncTaskRunner)
    assert "loss_mode=m2po is not supported under verl.experimental.fully_async_policy" in error


def test_an_existing_key_is_never_called_unknown():
    from m2po.dry_run import unknown_key_message

    assert unknown_key_message("data.train_batch_size", "m2po_paper", PAPER) is None  # hydra's own reason then
    assert unknown_key_message("data.train_batch_size.per_gpu", "m2po_paper", PAPER) == (
        "data.train_batch_size.per_gpu is not a key of the composed config; to add a new key, write "
        "+data.train_batch_size.per_gpu=<value>")


def test_main_ppos_driver_warns_too(tmp_path, monkeypatch, capsys):
    """The same warnings from verl's own validate_config (wrapped by the plugin), which main_ppo's driver
    calls before Ray starts."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    monkeypatch.chdir(tmp_path)
    config = paper_config("data.train_files=train.parquet", "actor_rollout_ref.model.path=/nowhere/model")
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    out = capsys.readouterr().out
    assert f"warning: data.train_files: 1 of 1 file(s) not found from {tmp_path}: train.parquet" in out
    assert "warning: actor_rollout_ref.model.path: /nowhere/model looks like a local path and does not exist" in out
