"""The testbed's experiment through verl (`python -m m2po.testbed --engine verl`): the pieces that make
a verl run the testbed's experiment, checked without starting verl's trainer. The runs themselves:
tests/test_verl_learning.py (CI) and docs/testbed-verl.md (the full comparison)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st

from m2po.configs import compose
from m2po.dry_run import validate_experiment
from m2po.testbed.config import ENGINES, VERL_METHODS, preset
from m2po.testbed.evaluation import draw_seed, evaluate, held_out_problems
from m2po.testbed.model import build_model, build_tokenizer, response_log_probs, sample
from m2po.testbed.task import BOS_ID, EOS_ID, PAD_ID, SYMBOLS, TOKEN_ID, task_from_json, task_to_json
from m2po.testbed.verl_engine import verl_overrides, write_data
from m2po.testbed.verl_report import crosscheck, evaluation_standard_error, verl_records
from m2po.testbed.verl_reward import TestbedRewardManager, score_response

CONFIG = preset("default")
TASK = CONFIG.task


# ---------------------------------------------------------------------- the policy and its prompt


def test_verls_token_builder_renders_exactly_the_testbeds_prompt():
    """verl's agent loop tokenizes a chat prompt with its Continuous Token builder (the generic one for
    a llama model_type): the chat template must give `<s>` + the problem, the testbed's prompt ids."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(build_tokenizer(), hf_model_type="llama")
    operands = TASK.sample_operands(20, torch.Generator().manual_seed(0))
    for pair, expected in zip(operands.tolist(), TASK.encode_prompts(operands).tolist()):
        messages = [{"role": "user", "content": f"{pair[0]:02d}+{pair[1]:02d}="}]
        assert builder.build_initial_tokens(messages) == expected


def test_the_policy_is_the_full_softmax_that_verl_recomputes():
    """The testbed's log-probs are log_softmax over the whole vocabulary of the HF model's logits,
    which is what verl's actor computes (no logit mask), and sampling can emit any token."""
    model = build_model(CONFIG.model, seed=0).eval()
    prompts = TASK.encode_prompts(TASK.sample_operands(8, torch.Generator().manual_seed(1)))
    responses, mask = sample(model, prompts, TASK.response_len, torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = response_log_probs(model, prompts, responses)
        logits = model(input_ids=torch.cat([prompts, responses], dim=1)).logits.float()
    reference = torch.log_softmax(logits[:, prompts.shape[1] - 1 : -1], dim=-1).gather(-1, responses[..., None])[..., 0]
    assert torch.equal(ours[mask], reference[mask])
    # a random model puts mass on every symbol: not only digits and EOS come out
    assert set(responses[mask].tolist()) - {TOKEN_ID[str(d)] for d in range(10)} - {EOS_ID}


# ---------------------------------------------------------------------- the reward


def literal_reward(a: int, b: int, ids: list[int], answer_start: int) -> float:
    """The copy_add reward spelled out: after the restatement, exactly the sum's digits and EOS, and
    no EOS before (what follows EOS is never generated)."""
    expected = [TOKEN_ID[c] for c in str(a + b)] + [EOS_ID]
    return float(ids[answer_start:] == expected and EOS_ID not in ids[:answer_start])


@st.composite
def responses(draw):
    a, b = draw(st.integers(0, 99)), draw(st.integers(0, 99))
    right = [TOKEN_ID[c] for c in f"{a:02d}{b:02d}" * 4 + str(a + b)] + [EOS_ID]
    kind = draw(st.sampled_from(["right", "edited", "random"]))
    if kind == "random":
        ids = draw(st.lists(st.integers(0, len(SYMBOLS) - 1), min_size=1, max_size=TASK.response_len + 3))
    else:
        ids = list(right)
        if kind == "edited":  # one token changed, inserted or dropped, anywhere
            position = draw(st.integers(0, len(ids) - 1))
            token = draw(st.sampled_from([PAD_ID, BOS_ID, EOS_ID, *range(len(SYMBOLS))]))
            action = draw(st.sampled_from(["replace", "insert", "drop"]))
            if action == "replace":
                ids[position] = token
            elif action == "insert":
                ids.insert(position, token)
            else:
                del ids[position]
    if EOS_ID in ids:  # the sampler stops at EOS
        ids = ids[: ids.index(EOS_ID) + 1]
    return a, b, ids or [EOS_ID]


@settings(max_examples=300, deadline=None)
@given(responses())
def test_the_verl_reward_is_the_tasks_exact_match(case):
    a, b, ids = case
    extra_info = {"a": a, "b": b, "task": task_to_json(TASK)}
    assert score_response(extra_info, ids) == literal_reward(a, b, ids, TASK.answer_start)


def test_a_pad_inside_the_answer_is_wrong_although_verl_would_decode_it_away():
    right = [TOKEN_ID[c] for c in "0745" * 4 + "52"] + [EOS_ID]
    extra_info = {"a": 7, "b": 45, "task": task_to_json(TASK)}
    assert score_response(extra_info, right) == 1.0
    assert score_response(extra_info, right[:-1] + [PAD_ID, EOS_ID]) == 0.0  # decodes to the same text
    assert score_response(extra_info, right[:-1]) == 0.0  # cut at the length limit: no EOS


def test_the_reward_manager_scores_a_verl_batch_row():
    from verl import DataProto

    right = [TOKEN_ID[c] for c in "0745" * 4 + "52"] + [EOS_ID]
    wrong = [TOKEN_ID[c] for c in "0745" * 4 + "53"] + [EOS_ID]
    prompt = TASK.encode_prompts(torch.tensor([[7, 45]]))[0].tolist()
    manager = TestbedRewardManager(config=None, tokenizer=build_tokenizer(), compute_score=None,
                                   reward_router_address=None, reward_model_tokenizer=None)
    for response, expected in ((right, 1.0), (wrong, 0.0)):
        padded = response + [PAD_ID] * (TASK.response_len - len(response))
        attention = [1] * (len(prompt) + len(response)) + [0] * (TASK.response_len - len(response))
        data = DataProto.from_dict(
            tensors={"prompts": torch.tensor([prompt]), "responses": torch.tensor([padded]),
                     "attention_mask": torch.tensor([attention])},
            non_tensors={"extra_info": np.array([{"a": 7, "b": 45, "task": task_to_json(TASK)}], dtype=object)},
        )
        result = manager.loop.run_until_complete(manager.run_single(data))
        assert result == {"reward_score": expected, "reward_extra_info": {"acc": expected}}


def test_tasks_round_trip_through_json_and_unknown_ones_are_refused():
    for name in ("addition", "copy_add"):
        task = preset("default", name).task
        assert task_from_json(task_to_json(task)) == task
    with pytest.raises(ValueError, match="task name must be one of"):
        task_from_json({"name": "copy"})


# ---------------------------------------------------------------------- data and config


def test_val_data_is_the_testbeds_held_out_set_and_train_data_is_uniform(tmp_path):
    config = dataclasses.replace(CONFIG, rl=dataclasses.replace(CONFIG.rl, eval_problems=64))
    train_file, val_file = write_data(config, str(tmp_path / "data"))
    val = pd.read_parquet(val_file)
    operands = held_out_problems(TASK, 64, seed=0)
    assert [(r["a"], r["b"]) for r in val["extra_info"]] == [tuple(p) for p in operands.tolist()]
    assert [m[0]["content"] for m in val["prompt"]] == [f"{a:02d}+{b:02d}=" for a, b in operands.tolist()]
    assert list(val["reward_model"].map(lambda r: r["ground_truth"])) == [str(a + b) for a, b in operands.tolist()]
    train = pd.read_parquet(train_file)
    rl = config.rl
    assert len(train) == 2 * rl.prompts_per_iteration * (rl.iterations + rl.staleness_updates // rl.mini_batches)
    assert 40 < np.mean([r["a"] for r in train["extra_info"]]) < 59  # uniform on 0..99


def test_evaluate_and_verl_validation_score_the_same_problems():
    """`evaluate` scores `held_out_problems` (the val parquet holds seed 0's): checked through the
    function itself, with a policy that records its prompts."""
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            seen.append(input_ids[:, : TASK.prompt_len].clone())
            raise StopIteration

    with pytest.raises(StopIteration):
        evaluate(Recorder(), TASK, 32, seed=0)
    expected = TASK.encode_prompts(held_out_problems(TASK, 32, seed=0))
    assert torch.equal(seen[0], expected)


def test_each_evaluation_draws_afresh_and_a_draw_is_reproducible(monkeypatch):
    """One sampling draw shared by every evaluation would bias all of them alike (docs/testbed-verl.md):
    the draw is keyed by what identifies the evaluation (a run's seed and iteration)."""
    import m2po.testbed.evaluation as evaluation

    seeds, original = [], evaluation.sample

    def recording_sample(model, prompts, response_len, generator):
        seeds.append(generator.initial_seed())
        return original(model, prompts, response_len, generator)

    monkeypatch.setattr(evaluation, "sample", recording_sample)
    model = build_model(CONFIG.model, seed=0).eval()
    for draw in ((0, 10), (0, 20), (1, 10), (0, 10)):
        evaluate(model, TASK, 8, seed=0, draw=draw)
    assert seeds[0] == seeds[3] == draw_seed(0, (0, 10))
    assert len(set(seeds[:3])) == 3


def test_the_overlay_holds_the_testbeds_default_settings():
    """configs/testbed/verl.yaml, used alone with main_ppo, is the default preset's experiment."""
    config = compose("m2po_trainer", ["+cpu=tiny", "+testbed=verl"])
    rl, actor = CONFIG.rl, config.actor_rollout_ref.actor
    assert config.data.train_batch_size == rl.prompts_per_iteration
    assert config.actor_rollout_ref.rollout.n == rl.samples_per_prompt
    assert config.data.train_batch_size // actor.ppo_mini_batch_size == rl.mini_batches
    assert (config.data.max_prompt_length, config.data.max_response_length) == (TASK.prompt_len, TASK.response_len)
    assert actor.optim.lr == rl.lr and actor.optim.clip_grad == rl.grad_clip == 1.0
    assert actor.clip_ratio == actor.clip_ratio_low == actor.clip_ratio_high == rl.clip_ratio
    assert actor.policy_loss.m2_threshold == rl.m2_threshold
    assert config.trainer.total_training_steps == rl.iterations
    assert (config.trainer.test_freq, config.trainer.save_freq) == (rl.eval_every, rl.checkpoint_every)
    assert actor.fsdp_config.mixed_precision.param_dtype == "fp32"


@pytest.mark.parametrize("method", list(VERL_METHODS))
def test_every_method_composes_and_passes_verls_start_up_checks(method, tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    overrides = verl_overrides(CONFIG, method, 3, "/base", "/train.parquet", "/val.parquet", str(tmp_path))
    resolved = validate_experiment(compose("m2po_trainer", overrides))
    spec, rl = VERL_METHODS[method], CONFIG.rl
    actor, trainer = resolved["actor_rollout_ref"]["actor"], resolved["trainer"]
    assert actor["policy_loss"]["loss_mode"] == spec.loss_mode
    assert resolved["m2po"]["stale"]["staleness_updates"] == (rl.staleness_updates if spec.stale else 0)
    expected_mode = "m2po_separate_async" if spec.asynchronous else "m2po_stale"
    assert trainer["v1"]["trainer_mode"] == expected_mode
    assert (resolved["data"]["seed"], resolved["actor_rollout_ref"]["rollout"]["seed"]) == (3, 1003)
    assert actor["optim"]["clip_grad"] == rl.grad_clip == 1.0 and actor["optim"]["lr"] == rl.lr
    if spec.asynchronous:  # pi_theta / pi_behav in the loss, 4 updates per weight sync
        assert resolved["algorithm"]["rollout_correction"]["bypass_mode"]
        assert trainer["v1"]["separate_async"]["parameter_sync_step"] == rl.mini_batches
    assert ENGINES["verl"] is VERL_METHODS


def test_settings_the_verl_engine_cannot_run_are_refused():
    for change, match in (({"m2po_variant": "clip"}, "mask variant only"), ({"warmup": "fill_queue"}, "base_policy")):
        config = dataclasses.replace(CONFIG, rl=dataclasses.replace(CONFIG.rl, **change))
        with pytest.raises(ValueError, match=match):
            verl_overrides(config, "m2po_stale", 0, "/b", "/t", "/v", "/r")
    with pytest.raises(ValueError, match="method must be one of"):
        verl_overrides(CONFIG, "m2po_clip", 0, "/b", "/t", "/v", "/r")


# ---------------------------------------------------------------------- report and cross-check


def test_verl_metrics_become_testbed_records():
    key = "val-core/copy_add/acc/mean@1"
    steps = {0: {key: 0.07}, 1: {"actor/pg_clipfrac": 0.01, "stale/staleness_updates": 0.0},
             2: {"actor/pg_clipfrac": 0.03, "actor/m2po/m2_before": 0.05, "actor/m2po/m2_after": 0.03,
                 "actor/m2po/m2_all_before": 0.02, "stale/staleness_updates_mean": 5.5, key: 0.2}}
    records, base = verl_records(steps, CONFIG)
    assert base == 0.07
    assert records == [
        {"iteration": 0, "updates": 4, "trained_hash": 1, "actor/pg_clipfrac": 0.01, "stale/staleness_updates": 0.0},
        {"iteration": 1, "updates": 8, "trained_hash": 2, "actor/pg_clipfrac": 0.03, "actor/m2po/m2_before": 0.05,
         "actor/m2po/m2_after": 0.03, "testbed/m2_all": 0.02, "stale/staleness_updates": 5.5, "accuracy": 0.2},
    ]


def test_the_tolerance_is_two_seed_sds_plus_two_evaluation_standard_errors():
    testbed = {"m2po_stale": {"0": {"auc": 0.28, "final": 0.36}, "1": {"auc": 0.30, "final": 0.40},
                              "2": {"auc": 0.29, "final": 0.38}}}
    verl = {"m2po_stale": {0: {"auc": 0.31, "final": 0.28}}, "m2po_async": {0: {"auc": 0.2, "final": 0.2}}}
    result = crosscheck(verl, testbed, eval_problems=512, evaluations=20)
    assert list(result) == ["m2po_stale"]  # nothing to compare an asynchronous run with
    auc, final = result["m2po_stale"]["auc"], result["m2po_stale"]["final"]
    assert math.isclose(auc["tolerance"], 2 * 0.01 + 2 * math.sqrt(0.29 * 0.71 / 512) / math.sqrt(20))
    assert math.isclose(auc["difference"], 0.02) and auc["within"]  # 0.02 <= 0.0291
    assert math.isclose(final["tolerance"], 2 * 0.02 + 2 * math.sqrt(0.38 * 0.62 / 512))  # 0.0829
    assert math.isclose(final["difference"], -0.10) and not final["within"]
    assert evaluation_standard_error(0.5, 100) == 0.05 and evaluation_standard_error(0.5, 100, 4) == 0.025


def test_the_verl_report_puts_both_engines_side_by_side(tmp_path):
    """summary.md/json and the plots from verl-style metrics of a few runs and testbed summaries."""
    import json

    from m2po.testbed.verl_report import write_verl_report

    key = "val-core/copy_add/acc/mean@1"
    config = dataclasses.replace(CONFIG, engine="verl", methods=("grpo_s0", "m2po_async"), seeds=(0,),
                                 rl=dataclasses.replace(CONFIG.rl, iterations=4, eval_every=2))

    def verl_run(accuracies, staleness):
        steps = {0: {key: 0.1}}
        for step in range(1, 5):
            steps[step] = {"actor/pg_clipfrac": 0.01, "actor/grad_norm": 0.5, "stale/staleness_updates": staleness}
        steps[2][key], steps[4][key] = accuracies
        records, base = verl_records(steps, config)
        return {0: {"records": records, "base_accuracy": base, "notes": []}}

    runs = {"grpo_s0": verl_run((0.2, 0.3), 0.0), "m2po_async": verl_run((0.15, 0.25), 5.5)}
    testbed_runs = {"grpo_s0": {s: [{"updates": 8, "accuracy": a}, {"updates": 16, "accuracy": b}]
                                for s, (a, b) in enumerate([(0.2, 0.31), (0.22, 0.3), (0.21, 0.32)])}}
    testbed_summary = {"base_accuracy": 0.1, "runs": {"grpo_s0": {
        str(s): {"auc": (a + b) / 2, "final": b, "masked_fraction": 0.0001, "m2_before": float("nan"),
                 "m2_after": float("nan")} for s, (a, b) in enumerate([(0.2, 0.31), (0.22, 0.3), (0.21, 0.32)])}}}
    path = write_verl_report(str(tmp_path), config, runs, testbed_summary, testbed_runs, "cmd", 60.0)
    text = open(path).read()
    # AUC: verl 0.25 against the testbed's 0.255, 0.26, 0.265 (mean 0.26, sd 0.005), over 2 evaluations
    tolerance = 2 * 0.005 + 2 * evaluation_standard_error(0.26, 512, 2)
    assert f"| GRPO, on-policy (s=0) | auc | 0.260 (0.005, 3) | 0.250 (1) | -0.010 | {tolerance:.3f} | yes |" in text
    assert "| M2PO, separate_async | 0 | 0.100 | 0.250 | 0.250 | - | 0.200 |" in text  # no testbed counterpart
    assert "5.5 (6)" in text  # its staleness
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["crosscheck"]) == {"grpo_s0"} and summary["crosscheck"]["grpo_s0"]["final"]["within"]
    for plot in ("accuracy.png", "crosscheck.png", "staleness.png"):
        assert (tmp_path / plot).stat().st_size > 0
