"""The registered losses through verl 0.9.1's own code paths."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.utils.losses import ppo_loss

from m2po.algorithm import LOSS_AGG_MODES, m2po_token_losses
from m2po.verl_integration.config import actor_config
from tests.verl_batches import micro_batch, response_grad

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", "PYTHONPATH")}


def test_import_verl_alone_registers_losses_in_a_fresh_process():
    # The exact command of the "done when": nothing of ours is imported explicitly.
    code = (
        "import verl; from verl.trainer.ppo.core_algos import get_policy_loss_fn; "
        "f = get_policy_loss_fn('m2po'); g = get_policy_loss_fn('no_trust_region'); "
        "print(f.__module__, g.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CLEAN_ENV, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["m2po.verl_integration.policy_losses"] * 2


def test_plugins_disabled_means_unregistered():
    """The control: the registration above really comes from the entry point."""
    code = "import verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; print('m2po' in R)"
    env = dict(CLEAN_ENV, VERL_USE_EXTERNAL_PLUGINS="none")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/")
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.ray
def test_registration_inside_a_ray_worker():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": ""}})
    try:

        @ray.remote
        def registered_in_worker():
            import verl  # noqa: F401  (the plugin loads here, in the worker process)
            from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

            return {name: POLICY_LOSS_REGISTRY[name].__module__ for name in ("m2po", "no_trust_region")}, os.getpid()

        modules, worker_pid = ray.get(registered_in_worker.remote(), timeout=180)
    finally:
        ray.shutdown()
    assert worker_pid != os.getpid()
    assert set(modules.values()) == {"m2po.verl_integration.policy_losses"}


def _data(seed, batch=4, length=7, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 2
    log_probs = old + scale * torch.randn(batch, length, generator=g)
    advantages = torch.randn(batch, 1, generator=g).expand(batch, length).clone()
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    prompts = torch.randint(1, 4, (batch,), generator=g).tolist()
    return log_probs, old, advantages, mask, prompts


@pytest.mark.parametrize("variant", ["mask", "clip"])
def test_ppo_loss_calls_m2po_with_the_global_token_normalisation(variant):
    """Two micro-batches of one mini-batch: loss = sum of M r A over the micro-batch / tokens of
    the whole mini-batch, gradients included, metrics under actor/m2po/."""
    micro = [_data(seed) for seed in (1, 2)]
    total_tokens = sum(int(m[3].sum()) for m in micro)
    config = actor_config(m2_threshold=0.04, m2po_variant=variant, m2_scope="micro_batch")
    for log_probs, old, advantages, mask, prompts in micro:
        model_output, data, flat = micro_batch(
            log_probs, old, advantages, mask, prompts, batch_num_tokens=total_tokens, global_batch_size=8
        )
        loss, metrics = ppo_loss(config, model_output, data)
        loss.backward()

        lp = log_probs.clone().requires_grad_()
        expected = m2po_token_losses(lp, old, advantages, mask, 0.04, variant)
        (expected.token_losses.sum() / total_tokens).backward()
        torch.testing.assert_close(loss, expected.token_losses.sum() / total_tokens)
        torch.testing.assert_close(response_grad(flat.grad, mask, prompts), lp.grad)
        keys = {k for k in metrics if k.startswith("actor/m2po/")}
        assert {"actor/m2po/m2_before", "actor/m2po/m2_after", "actor/m2po/masked_fraction"} <= keys
        assert metrics["actor/m2po/masked_fraction"].aggregate() == metrics["actor/pg_clipfrac"].aggregate()
        assert ("actor/m2po/log_ratio_cap" in keys) == (variant == "clip")


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("dp_size", [1, 2])
def test_no_trust_region_normalises_exactly_like_vanilla(mode, dp_size):
    """With clipping out of reach, verl's vanilla PPO loss *is* the no-trust-region loss, so the two
    must agree to the bit under every aggregation mode and global-batch setting."""
    log_probs, old, advantages, mask, prompts = _data(3, scale=0.05)  # |log r| << 1e6 clip range
    kwargs = dict(batch_num_tokens=int(mask.sum()) * 3, global_batch_size=11, dp_size=dp_size)
    results = {}
    for loss_mode in ("vanilla", "no_trust_region", "m2po"):
        config = actor_config(loss_mode=loss_mode, loss_agg_mode=mode, clip_ratio=1e6, m2_threshold=float("inf"), m2_scope="micro_batch")
        model_output, data, flat = micro_batch(log_probs, old, advantages, mask, prompts, **kwargs)
        loss, _ = ppo_loss(config, model_output, data)
        loss.backward()
        results[loss_mode] = (loss.detach(), flat.grad)
    for loss_mode in ("no_trust_region", "m2po"):
        torch.testing.assert_close(results[loss_mode][0], results["vanilla"][0])
        torch.testing.assert_close(results[loss_mode][1], results["vanilla"][1])


def test_ppo_loss_passes_rollout_is_weights_through():
    log_probs, old, advantages, mask, prompts = _data(4)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) + 0.5
    config = actor_config(m2_threshold=0.04, m2_scope="micro_batch")
    n = int(mask.sum())
    mo_w, data_w, _ = micro_batch(
        log_probs, old, advantages, mask, prompts, batch_num_tokens=n, global_batch_size=4, rollout_is_weights=weights
    )
    mo, data, _ = micro_batch(log_probs, old, advantages, mask, prompts, batch_num_tokens=n, global_batch_size=4)
    loss_w, _ = ppo_loss(config, mo_w, data_w)
    expected = m2po_token_losses(log_probs, old, advantages, mask, 0.04, importance_weights=weights)
    torch.testing.assert_close(loss_w, expected.token_losses.sum() / n)
    loss, _ = ppo_loss(config, mo, data)
    assert not torch.isclose(loss_w, loss)


def test_m2po_without_its_config_class_falls_back_to_paper_defaults():
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    config = FSDPActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=PolicyLossConfig(loss_mode="m2po")
    )
    log_probs, old, advantages, mask, _ = _data(5)
    loss, metrics = get_policy_loss_fn("m2po")(
        old_log_prob=old, log_prob=log_probs, advantages=advantages, response_mask=mask, config=config
    )
    expected = m2po_token_losses(log_probs, old, advantages, mask, 0.04, "mask")
    torch.testing.assert_close(loss, expected.token_losses.sum() / mask.sum())


def test_our_trainers_refuse_another_verl_version_by_name(monkeypatch):
    import verl

    from m2po.verl_integration.verl_internals import check_verl_version

    check_verl_version("trainer.v1.trainer_mode=m2po_stale")  # the installed, supported one
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match=r"trainer.v1.trainer_mode=m2po_stale relies on .* refuses verl 0\.10\.0: install verl==0\.9\.1"):
        check_verl_version("trainer.v1.trainer_mode=m2po_stale")


def test_the_listed_verl_internals_are_where_the_list_says():
    """Each entry names a file (and lines) of the installed verl: a verl upgrade that moves them
    shows up here, next to the version guard."""
    import verl

    from m2po.verl_integration.verl_internals import VERL_INTERNALS

    root = os.path.dirname(verl.__file__)
    for what, where, why in VERL_INTERNALS:
        path, _, lines = where.partition(":")
        with open(os.path.join(root, path)) as f:
            source = f.read().splitlines()
        for line in filter(None, lines.replace("-", ",").split(",")):
            assert int(line) <= len(source), (what, where)
        assert why
