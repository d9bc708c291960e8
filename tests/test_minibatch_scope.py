"""`policy_loss.m2_scope=mini_batch` through verl's real FSDP actor engine on CPU (1 and 2 gloo ranks).

One mini-batch of 8 sequences, trained by verl's `FSDPEngine.forward_backward_batch` with verl's
`ppo_loss` under dynamic batching (two token budgets), fixed micro-batches of 1 sequence and of the
whole share, and on 1 or 2 data-parallel ranks (tests/minibatch_scope_worker.py). Checked against
the literal Algorithm 1 of tests/reference.py on the concatenated mini-batch: the keep-mask token for
token, the clip variant's cap, the decoupled variant's mask; and the gradient against the one of a
single micro-batch on one rank, up to float summation order. The per-micro-batch scope on the same
data gives a gradient 25% away, so the gradient check can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from m2po.algorithm import cut_inputs, decoupled_cut_inputs, m2po_token_losses, minibatch_clip_bound, minibatch_keep_masks
from tests import minibatch_scope_worker as worker
from tests.reference import algorithm1_keep_mask, authors_clip_cap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLDS = (1, 2)
MINI_BATCH_SETTINGS = [s[0] for s in worker.SETTINGS if s[5] == "mini_batch"]
# float32 compute; measured differences across micro-batchings and ranks: 3e-7 relative, 8e-8 absolute
GRADIENT_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("minibatch-scope")
    env = {**os.environ, "VERL_PLATFORM": "cpu"}
    for world in WORLDS:
        done = subprocess.run(
            [sys.executable, "-m", "tests.minibatch_scope_worker", "--world", str(world), "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def load(world, name):
        return load_file(os.path.join(out, f"{world}-{name}.safetensors"))

    return load


def _setting(name):
    return next(s for s in worker.SETTINGS if s[0] == name)


def _reference_inputs(runs, world, name):
    inputs, result = runs(1, "inputs"), runs(world, name)
    mask = inputs["response_mask"].bool()
    log_ratio, candidates = cut_inputs(result["log_probs"], inputs["old_log_probs"], inputs["advantages"], mask)
    return inputs, result, mask, log_ratio, candidates


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [n for n in MINI_BATCH_SETTINGS if _setting(n)[4] == "mask"])
def test_mask_is_algorithm1_over_the_concatenated_mini_batch(runs, world, name):
    inputs, result, mask, log_ratio, candidates = _reference_inputs(runs, world, name)
    # verl's forward under this micro-batching against one forward over the share: float32 last bits only
    assert float((result["log_probs"] - inputs["log_probs"])[mask].abs().max()) < 1e-6
    expected = algorithm1_keep_mask(log_ratio, candidates, worker.TAU)
    keep = result["keep_mask"].bool()
    assert torch.equal(keep | ~mask, expected | ~mask)
    assert int((~expected & mask).sum()) >= 3  # the cut has work to do on this batch
    # actor/m2po/cut_*: the same on every row of every rank, and what Algorithm 1 guarantees
    stats = result["minibatch_stats"]
    assert torch.all(stats == stats[0])
    kept = candidates & expected
    m2_after = float(log_ratio.double().square()[kept].mean())
    assert float(stats[0, 0]) == pytest.approx(m2_after, rel=1e-9) and m2_after <= worker.TAU
    assert float(stats[0, 1]) == int((candidates & ~expected).sum()) / int(mask.sum())
    # and the same tokens whatever the micro-batching and the number of ranks
    assert torch.equal(keep | ~mask, runs(1, "micro-all")["keep_mask"].bool() | ~mask)


@pytest.mark.parametrize("world", WORLDS)
def test_each_micro_batch_reports_what_its_own_cut_would_have_changed(runs, world):
    """actor/m2po/micro_scope_differ_fraction with one-sequence micro-batches: per sequence, the valid tokens
    that Algorithm 1 over that sequence alone masks differently from the mini-batch's cut."""
    _, result, mask, log_ratio, candidates = _reference_inputs(runs, world, "micro-1")
    whole = algorithm1_keep_mask(log_ratio, candidates, worker.TAU) | ~candidates
    expected = []
    for i in range(len(mask)):
        own = algorithm1_keep_mask(log_ratio[i : i + 1], candidates[i : i + 1], worker.TAU) | ~candidates[i : i + 1]
        expected.append(float(((own != whole[i : i + 1]) & mask[i : i + 1]).sum() / mask[i].sum()))
    torch.testing.assert_close(result["micro_scope_differ"], torch.tensor(expected, dtype=torch.float64))
    assert max(expected) > 0  # per sequence, the cut is another one on this batch


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [n for n in MINI_BATCH_SETTINGS if _setting(n)[4] == "clip"])
def test_clip_cap_is_solved_over_the_concatenated_mini_batch(runs, world, name):
    _, result, _, log_ratio, candidates = _reference_inputs(runs, world, name)
    caps = result["log_ratio_cap"]
    assert torch.all(caps == caps[0])  # one cap, on every row of every rank
    assert float(caps[0]) == pytest.approx(authors_clip_cap(log_ratio, candidates, worker.TAU), rel=1e-12)
    assert float(caps[0]) < 1.0  # binding on this batch


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", [n for n in MINI_BATCH_SETTINGS if _setting(n)[4] == "decoupled"])
def test_decoupled_mask_is_taken_over_the_mini_batch(runs, world, name):
    inputs, result = runs(1, "inputs"), runs(world, name)
    mask = inputs["response_mask"].bool()
    staleness = decoupled_cut_inputs(inputs["rollout_is_weights"].log(), mask)
    expected = algorithm1_keep_mask(staleness, mask, worker.TAU)
    assert torch.equal(result["keep_mask"].bool() | ~mask, expected | ~mask)
    assert int((~expected & mask).sum()) >= 3


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", MINI_BATCH_SETTINGS)
def test_gradient_is_that_of_one_micro_batch_on_one_rank(runs, world, name):
    variant = _setting(name)[4]
    reference = runs(1, {"mask": "micro-all", "clip": "clip-micro-all", "decoupled": "decoupled-micro-all"}[variant])
    gradient = runs(world, name)["gradient"]
    torch.testing.assert_close(gradient, reference["gradient"], rtol=GRADIENT_RTOL, atol=GRADIENT_RTOL * 1e-2)


@pytest.mark.parametrize("world", WORLDS)
def test_per_micro_batch_scope_trains_something_else(runs, world):
    """The check above can fail: one-sequence micro-batches under m2_scope=micro_batch mask per sequence."""
    gradient, reference = runs(world, "per-micro-1")["gradient"], runs(1, "micro-all")["gradient"]
    assert (gradient - reference).norm() > 0.05 * reference.norm()


# --------------------------------------------------------------- the loss given a cut decided elsewhere


def _micro_batches(seed=3, rows=(3, 1, 4), width=12):
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in rows:
        mask = torch.rand(n, width, generator=g) < 0.8
        parts.append({
            "log_probs": -1.0 + 0.35 * torch.randn(n, width, generator=g),
            "behaviour_log_probs": torch.full((n, width), -1.0),
            "advantages": torch.randn(n, 1, generator=g).expand(n, width).clone(),
            "response_mask": mask,
        })
    return parts


@pytest.mark.parametrize("variant", ["mask", "clip"])
def test_loss_with_the_mini_batch_cut_equals_the_loss_of_the_concatenation(variant):
    parts = _micro_batches()
    cut = [cut_inputs(p["log_probs"], p["behaviour_log_probs"], p["advantages"], p["response_mask"]) for p in parts]
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    expected = m2po_token_losses(**whole, variant=variant)
    if variant == "mask":
        keeps = minibatch_keep_masks([c[0] for c in cut], [c[1] for c in cut], 0.04)
        got = [m2po_token_losses(**p, keep_mask=k) for p, k in zip(parts, keeps)]
    else:
        cap = minibatch_clip_bound([c[0] for c in cut], [c[1] for c in cut], 0.04)
        got = [m2po_token_losses(**p, variant="clip", log_ratio_cap=cap) for p in parts]
    assert int((~expected.keep_mask & whole["response_mask"]).sum()) > 0
    torch.testing.assert_close(torch.cat([g.token_losses for g in got]), expected.token_losses, rtol=1e-6, atol=1e-7)
    assert torch.equal(torch.cat([g.keep_mask for g in got]), expected.keep_mask)


def test_a_cut_that_does_not_fit_is_refused():
    p = _micro_batches(rows=(2,))[0]
    with pytest.raises(ValueError, match="keep_mask must be a bool tensor shaped like response_mask"):
        m2po_token_losses(**p, keep_mask=torch.ones(3, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="takes log_ratio_cap"):
        m2po_token_losses(**p, variant="clip", keep_mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="0-dim"):
        m2po_token_losses(**p, variant="clip", log_ratio_cap=torch.ones(2))


# ----------------------------------------------------------------------------------- config and refusals


def test_scope_key_is_validated_naming_it():
    from m2po.verl_integration.config import M2POPolicyLossConfig

    assert M2POPolicyLossConfig().m2_scope == "mini_batch"
    with pytest.raises(ValueError, match=r"policy_loss\.m2_scope must be one of \['mini_batch', 'micro_batch'\]"):
        M2POPolicyLossConfig(m2_scope="minibatch")
    with pytest.raises(ValueError, match="m2_scope=micro_batch with it"):
        M2POPolicyLossConfig(loss_mode="m2po", m2po_variant="decoupled", decoupled_denominator="kept")
    M2POPolicyLossConfig(loss_mode="m2po", m2po_variant="decoupled", decoupled_denominator="kept", m2_scope="micro_batch")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"strategy": "megatron"}, "actor_rollout_ref.actor.strategy='megatron' is not one (fsdp or fsdp2)"),
        ({"distillation": True}, "not with distillation.enabled=true's loss"),
    ],
)
def test_mini_batch_scope_is_refused_at_start_up_where_it_cannot_work(overrides, fragment):
    from m2po.verl_integration.startup_checks import check_m2po_config

    def config(scope, loss_mode="m2po"):
        return OmegaConf.create({
            "actor_rollout_ref": {"actor": {"strategy": overrides.get("strategy", "fsdp2"),
                                            "policy_loss": {"loss_mode": loss_mode, "m2_scope": scope}}},
            "distillation": {"enabled": overrides.get("distillation", False)},
        })

    with pytest.raises(ValueError, match="actor_rollout_ref.actor.policy_loss.m2_scope=mini_batch") as error:
        check_m2po_config(config("mini_batch"))
    assert fragment in str(error.value)
    check_m2po_config(config("micro_batch"))
    check_m2po_config(config("mini_batch", loss_mode="vanilla"))


def test_loss_under_a_strategy_that_decides_no_cut_refuses():
    """Under the mini-batch scope, a loss called by an engine that does not decide the cut (the actor's
    strategy is not FSDP) raises instead of quietly masking per micro-batch; a direct call with the
    package's FSDP actor config (the testbed's: one whole mini-batch per call) does not."""
    from types import SimpleNamespace

    from m2po.verl_integration.config import M2POPolicyLossConfig, actor_config
    from m2po.verl_integration.policy_losses import compute_policy_loss_m2po

    p = _micro_batches(rows=(2,))[0]
    arguments = dict(old_log_prob=p["behaviour_log_probs"], log_prob=p["log_probs"], advantages=p["advantages"],
                     response_mask=p["response_mask"])
    compute_policy_loss_m2po(**arguments, config=actor_config())

    def megatron(scope):
        return SimpleNamespace(strategy="megatron", global_batch_info={},
                               policy_loss=M2POPolicyLossConfig(loss_mode="m2po", m2_scope=scope))

    with pytest.raises(RuntimeError, match="strategy 'megatron' does not decide the mini-batch's cut"):
        compute_policy_loss_m2po(**arguments, config=megatron("mini_batch"))
    compute_policy_loss_m2po(**arguments, config=megatron("micro_batch"))


def test_a_plain_policy_loss_config_gets_the_papers_settings_and_the_default_scope():
    """loss_mode=m2po under verl's own PolicyLossConfig (no M2PO keys): the hook decides the mini-batch cut
    with the values the loss itself falls back to."""
    from types import SimpleNamespace

    from verl.workers.config import PolicyLossConfig

    from m2po.algorithm import PAPER_M2_THRESHOLD
    from m2po.verl_integration.minibatch_scope import m2po_settings, wants_minibatch_cut

    plain = PolicyLossConfig(loss_mode="m2po")
    assert wants_minibatch_cut(SimpleNamespace(policy_loss=plain))
    assert not wants_minibatch_cut(SimpleNamespace(policy_loss=PolicyLossConfig(loss_mode="vanilla")))
    assert m2po_settings(plain) == (PAPER_M2_THRESHOLD, "mask")


def test_metric_names_escape_verls_min_max_reduction():
    """verl's reduce_metrics takes np.min / np.max over a step's updates for any key containing "min" / "max"
    (a first version named these minibatch_*, and verl logged the smallest mini-batch's value)."""
    from m2po.verl_integration.minibatch_scope import MINIBATCH_STATS

    for name in (*MINIBATCH_STATS, "micro_scope_differ_fraction"):
        assert "min" not in name and "max" not in name, name
