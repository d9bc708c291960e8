"""The sweep's criterion (m2po.testbed.sweep) on synthetic curves, and the testbed's gradient-carrier
diagnostics (m2po.testbed.rl.gradient_carriers) against a hand computation and autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from m2po.testbed import sweep
from m2po.testbed.config import RLConfig
from m2po.testbed import experiment


def _records(accuracies, masked=0.0, every=10):
    """A run's records with an evaluation every `every` iterations (4 updates per iteration)."""
    records = []
    for k, accuracy in enumerate(accuracies):
        iteration = (k + 1) * every - 1
        records.append({"iteration": iteration - 1, "updates": 4 * iteration, "trained_hash": "x",
                        "actor/pg_clipfrac": masked})
        records.append({"iteration": iteration, "updates": 4 * (iteration + 1), "accuracy": accuracy})
    return records


ON_POLICY = [0.10, 0.20, 0.30, 0.35, 0.40, 0.42]
PAPERS_PICTURE = {
    "grpo_s0": ON_POLICY,
    "grpo_stale": [0.08, 0.15, 0.22, 0.28, 0.33, 0.36],
    "no_tr_stale": [0.10, 0.20, 0.31, 0.30, 0.20, 0.15],  # keeps pace, then falls 0.16
    "m2po_stale": [0.10, 0.20, 0.29, 0.35, 0.39, 0.41],
}


def _runs(curves, masked=0.001, seeds=(0, 1, 2), per_seed=None):
    runs = {}
    for method, accuracies in curves.items():
        runs[method] = {}
        for seed in seeds:
            values = (per_seed or {}).get((method, seed), accuracies)
            runs[method][seed] = _records(values, masked=masked if method == "m2po_stale" else 0.0)
    return runs


def test_the_papers_picture_meets_all_four_parts():
    verdict = sweep.judge(_runs(PAPERS_PICTURE), base_accuracy=0.05)
    assert verdict["passed"] == {"slower": True, "pace_then_collapse": True, "m2po_close_and_stable": True,
                                 "masked_under_1pct": True}
    assert verdict["met"] == 4
    assert verdict["no_tr_collapsed_seeds"] == 3
    assert verdict["no_tr_gap_at_its_best"] == pytest.approx(0.01)
    assert verdict["auc"]["m2po_stale"] == pytest.approx(sum(PAPERS_PICTURE["m2po_stale"]) / 6)
    # M2PO's AUC minus the better of stale GRPO's and no-TR's
    assert verdict["m2po_lead"] == pytest.approx((sum(PAPERS_PICTURE["m2po_stale"]) - sum(PAPERS_PICTURE["grpo_stale"])) / 6)


@pytest.mark.parametrize(
    "change, failed",
    [
        # stale GRPO as fast as on-policy
        (dict(grpo_stale=ON_POLICY), "slower"),
        # no-TR never collapses
        (dict(no_tr_stale=[0.10, 0.20, 0.30, 0.34, 0.36, 0.37]), "pace_then_collapse"),
        # no-TR collapses but never kept pace (0.05 behind at its best)
        (dict(no_tr_stale=[0.05, 0.15, 0.25, 0.20, 0.15, 0.10]), "pace_then_collapse"),
        # M2PO collapses too
        (dict(m2po_stale=[0.10, 0.20, 0.30, 0.35, 0.30, 0.28]), "m2po_close_and_stable"),
        # M2PO stable but slow (AUC 0.02 below on-policy)
        (dict(m2po_stale=[v - 0.02 for v in ON_POLICY]), "m2po_close_and_stable"),
    ],
)
def test_each_part_can_fail_alone(change, failed):
    verdict = sweep.judge(_runs(dict(PAPERS_PICTURE, **change)), base_accuracy=0.05)
    assert [k for k, v in verdict["passed"].items() if not v] == [failed]
    assert verdict["met"] == 3


def test_masked_fraction_and_collapse_in_too_few_seeds():
    verdict = sweep.judge(_runs(PAPERS_PICTURE, masked=0.004), base_accuracy=0.05)
    assert not verdict["passed"]["masked_under_1pct"] and verdict["m2po_masked_fraction"] == pytest.approx(0.004)
    steady = [0.10, 0.20, 0.31, 0.32, 0.33, 0.33]
    one_seed = sweep.judge(_runs(PAPERS_PICTURE, per_seed={("no_tr_stale", 1): steady, ("no_tr_stale", 2): steady}),
                           base_accuracy=0.05)
    assert one_seed["no_tr_collapsed_seeds"] == 1 and not one_seed["passed"]["pace_then_collapse"]
    # one M2PO seed dropping 0.07 after its peak fails stability, whatever the others do
    dip = sweep.judge(_runs(PAPERS_PICTURE, per_seed={("m2po_stale", 2): [0.10, 0.20, 0.36, 0.29, 0.39, 0.41]}),
                      base_accuracy=0.05)
    assert dip["m2po_worst_drop_max"] == pytest.approx(0.07) and not dip["passed"]["m2po_close_and_stable"]


def test_the_criterion_needs_all_four_methods():
    runs = _runs(PAPERS_PICTURE)
    del runs["no_tr_stale"]
    with pytest.raises(ValueError, match=r"missing \['no_tr_stale'\]"):
        sweep.judge(runs, base_accuracy=0.05)


def test_truncation_keeps_the_first_iterations_and_ranking_prefers_more_parts_then_lead_then_shorter():
    records = _records(ON_POLICY)
    assert [r["accuracy"] for r in sweep.truncate(records, 30) if "accuracy" in r] == ON_POLICY[:3]
    keys = sorted([(sweep.rank_key({"met": 3, "m2po_lead": 0.05}, 300), "a"),
                   (sweep.rank_key({"met": 4, "m2po_lead": 0.01}, 300), "b"),
                   (sweep.rank_key({"met": 4, "m2po_lead": 0.01}, 200), "c"),
                   (sweep.rank_key({"met": 4, "m2po_lead": 0.02}, 300), "d")])
    assert [name for _, name in keys] == ["d", "c", "b", "a"]


def test_gradient_carriers_by_hand_and_by_autograd():
    from m2po.testbed.rl import gradient_carriers

    # ratios e^d: tokens (A>0, r>1) trust region; (A<0, r>1.5) negative-advantage, large; (A<0, r<1) trust
    # region; (A>0, r<1) neither; a padded token with a huge ratio that must not count.
    d = torch.tensor([[0.1, math.log(1.5), -0.2], [-0.1, 5.0, 0.0]])
    advantages = torch.tensor([[1.0, -2.0, -1.0], [0.5, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    log_probs = d.clone().requires_grad_(True)
    behaviour = torch.zeros_like(d)
    # no-trust-region loss, token mean: -A r over the valid tokens / n
    loss = -(torch.where(mask, advantages * log_probs.exp(), 0.0)).sum() / mask.sum()
    loss.backward()
    out = gradient_carriers(log_probs.grad, log_probs.detach(), behaviour, advantages, mask, large_ratio=1.2)
    weights = [1.0 * math.exp(0.1), 2.0 * 1.5, 1.0 * math.exp(-0.2), 0.5 * math.exp(-0.1), 1.0]  # |A| r
    total = sum(weights)
    assert out["testbed/grad_share_trust_region"] == pytest.approx((weights[0] + weights[2]) / total)
    assert out["testbed/grad_share_neg_adv_ratio_up"] == pytest.approx(weights[1] / total)
    assert out["testbed/grad_share_neg_adv_large_ratio"] == pytest.approx(weights[1] / total)
    assert out["testbed/max_ratio"] == pytest.approx(1.5)
    assert out["testbed/max_token_grad_share"] == pytest.approx(weights[1] / total)
    small = gradient_carriers(log_probs.grad, log_probs.detach(), behaviour, advantages, mask, large_ratio=1.6)
    assert small["testbed/grad_share_neg_adv_large_ratio"] == 0.0


def test_grad_clip_none_and_bad_values(capsys):
    with pytest.raises(ValueError, match="rl.grad_clip must be a positive number or None"):
        RLConfig(grad_clip=0.0)
    for bad in ("0", "-1", "inf", "off"):
        with pytest.raises(SystemExit):
            experiment.main(["--grad-clip", bad, "--workers", "0"])
        assert "expected a positive number or 'none'" in capsys.readouterr().err
    assert experiment._grad_clip(" None") == "none" and experiment._grad_clip("1.0") == 1.0


def test_largest_drop_and_its_windows():
    from m2po.testbed import drop_analysis

    # evaluations at iterations 9, 19, ..., 59: peak 0.40 at 29, trough 0.22 at 49 (not the last evaluation)
    records = _records([0.10, 0.30, 0.40, 0.35, 0.22, 0.30])
    for r in records:
        if "trained_hash" in r:
            r.update({"grad_norm": r["iteration"] / 10, "grad_norm_max": r["iteration"], "rollout_reward": 0.5})
    drop = drop_analysis.largest_drop(records, base_accuracy=0.05)
    assert drop["drop"] == pytest.approx(0.18)
    assert (drop["peak_iteration"], drop["peak_updates"], drop["peak_accuracy"]) == (29, 120, 0.40)
    assert (drop["trough_iteration"], drop["trough_updates"], drop["trough_accuracy"]) == (49, 200, 0.22)
    # trained records sit at iterations 8, 18, ...: `before` (window 25: iterations 5..29) holds 8, 18, 28;
    # `drop` (30..49) holds 38, 48
    result = drop_analysis.analyse_run(records, 0.05, window=25, control=records)
    assert result["before"]["iterations"] == 3 and result["during"]["iterations"] == 2
    assert result["before"]["grad_norm"] == pytest.approx((0.8 + 1.8 + 2.8) / 3)
    assert result["during"]["grad_norm_max"] == 48  # the largest, not the mean
    assert np.isnan(result["during"]["actor/m2po/m2_before"])  # absent from these records
    assert result["control_during"]["grad_norm_max"] == 48 and result["control_before"]["iterations"] == 3
    # a run that only rises: no drop, reported at the base policy
    rising = drop_analysis.largest_drop(_records([0.1, 0.2]), base_accuracy=0.05)
    assert rising["drop"] == 0.0 and rising["peak_iteration"] == rising["trough_iteration"] == -1
    # the base policy can be the peak
    falling = drop_analysis.largest_drop(_records([0.03, 0.01]), base_accuracy=0.05)
    assert (falling["peak_iteration"], falling["peak_updates"], falling["drop"]) == (-1, 0, pytest.approx(0.04))


def test_the_drop_plots_running_max_keeps_a_spike_and_the_mean_averages():
    from m2po.testbed.drop_analysis import _smooth

    values = [0.0, 0.0, 6.0, 0.0, 0.0, 0.0]
    assert _smooth(values, "max", width=3).tolist() == [0.0, 6.0, 6.0, 6.0, 0.0, 0.0]
    assert _smooth(values, "mean", width=3).tolist() == [0.0, 2.0, 2.0, 2.0, 0.0, 0.0]


# ------------------------------------------------------------ the mask scope in the testbed (--m2-micro-batch)


def _testbed_mini_batch(seed=0, rows=8, width=6):
    g = torch.Generator().manual_seed(seed)
    return {
        "old_log_probs": torch.full((rows, width), -1.0),
        "advantages": torch.randn(rows, 1, generator=g).expand(rows, width).clone(),
        "response_mask": torch.rand(rows, width, generator=g) < 0.8,
    }, -1.0 + 0.4 * torch.randn(rows, width, generator=g)


@pytest.mark.parametrize("tau", [math.inf, 0.04])
def test_per_micro_batch_loss_calls_differ_from_one_call_only_by_the_cut(tau):
    """rl.m2_micro_batch = k calls the loss per k sequences, normalised by the mini-batch's tokens: without a
    mask (tau = inf) the loss and gradient are those of one call; with tau = 0.04 only the cut differs."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from m2po.testbed.rl import _mini_batch_loss
    from m2po.verl_integration.config import actor_config

    mini, values = _testbed_mini_batch()
    mini["advantages"][0] = 5.0  # one sequence far above the rest: per sequence, its cut is another one
    results = {}
    for k, scope in ((8, "mini_batch"), (2, "micro_batch")):
        actor = actor_config(m2_threshold=tau, m2_scope=scope)
        actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(mini["response_mask"].sum()), global_batch_size=8)
        log_probs = values.clone().requires_grad_(True)
        loss, metrics = _mini_batch_loss(get_policy_loss_fn("m2po"), actor, mini, log_probs, k)
        loss.backward()
        results[k] = (loss.detach(), log_probs.grad, metrics["actor/m2po/masked_fraction"])
    if math.isinf(tau):
        torch.testing.assert_close(results[2][0], results[8][0])
        torch.testing.assert_close(results[2][1], results[8][1])
    else:
        assert results[8][2] > 0 and not torch.allclose(results[2][1], results[8][1])


def test_m2_micro_batch_must_divide_the_mini_batch():
    assert RLConfig(m2_micro_batch=4).m2_micro_batch == 4
    for bad in (0, 3, 64):
        with pytest.raises(ValueError, match=r"rl.m2_micro_batch must divide the mini-batch of 32 sequences"):
            RLConfig(m2_micro_batch=bad)


def _summary(tmp_path, name, aucs, finals, lr=5e-5):
    import json

    folder = tmp_path / name
    folder.mkdir()
    runs = {"m2po_stale": {str(seed): {"auc": a, "final": f} for seed, (a, f) in enumerate(zip(aucs, finals))}}
    rl = {"iterations": 300, "eval_every": 10, "eval_problems": 512, "lr": lr}
    (folder / "summary.json").write_text(json.dumps({"runs": runs, "config": {"rl": rl}}))
    return str(folder)


def test_compare_applies_the_cross_checks_tolerance(tmp_path):
    from m2po.testbed.compare import compare, main

    reference = _summary(tmp_path, "reference", [0.24, 0.25, 0.245], [0.30, 0.31, 0.305])
    close = _summary(tmp_path, "close", [0.246, 0.244, 0.245], [0.31, 0.30, 0.32])
    far = _summary(tmp_path, "far", [0.20, 0.21, 0.205], [0.30, 0.31, 0.305])
    row = compare(reference, close)["m2po_stale"]["auc"]
    # 2 x sd (0.005) + 2 x sqrt(p(1-p)/512)/sqrt(30) at p = 0.245
    assert row["tolerance"] == pytest.approx(2 * 0.005 + 2 * math.sqrt(0.245 * 0.755 / 512) / math.sqrt(30))
    assert row["within"] and compare(reference, close)["m2po_stale"]["final"]["within"]
    assert not compare(reference, far)["m2po_stale"]["auc"]["within"]
    assert main([reference, far]) == 0 and (tmp_path / "far" / "compare.json").exists()
    with pytest.raises(SystemExit, match="differ in more RL settings"):
        compare(reference, _summary(tmp_path, "other-lr", [0.2] * 3, [0.3] * 3, lr=1e-4))
