"""m2po.stale settings (u from the mini-batch structure, start-up errors) and the TransferQueue
batch codec (exact round trip of every kind of field), without Ray."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import NonTensorStack, TensorDict

from m2po.configs import compose
from m2po.verl_integration.stale_settings import StaleSectionConfig, stale_settings_from_config, updates_per_iteration
from m2po.verl_integration.transfer_queue_codec import decode_batch, encode_batch


def _cfg(**stale):
    return OmegaConf.create(
        {
            "data": {"train_batch_size": 256},
            "actor_rollout_ref": {"actor": {"ppo_mini_batch_size": 64, "ppo_epochs": 2}, "rollout": {}},
            "trainer": {"use_v1": True, "v1": {"trainer_mode": "m2po_stale"}, "default_local_dir": "/ckpt"},
            "m2po": {"stale": stale},
        }
    )


def test_updates_per_iteration_counts_mini_batches_and_epochs():
    assert updates_per_iteration(_cfg()) == 8
    cfg = _cfg()
    cfg.actor_rollout_ref.actor.ppo_mini_batch_size = 96
    with pytest.raises(ValueError, match=r"data.train_batch_size \(256\) must be a multiple of .*ppo_mini_batch_size \(96\)"):
        updates_per_iteration(cfg)


def test_on_policy_accepts_what_only_stale_runs_cannot_use():
    cfg = _cfg()
    OmegaConf.update(cfg, "trainer.critic_warmup", 2, force_add=True)
    OmegaConf.update(cfg, "algorithm.filter_groups.enable", True, force_add=True)
    assert not stale_settings_from_config(cfg).enabled


def test_settings_defaults_and_conversions():
    settings = stale_settings_from_config(_cfg(staleness_updates=256, ram_budget_gb=0.5))
    assert settings.staleness.delay_iterations == 32 and settings.enabled
    assert settings.ram_budget_bytes == 2**29 and settings.spill_dir == "/ckpt/m2po_stale_store"
    assert settings.behaviour_log_probs == "actor" and settings.staleness.warmup == "base_policy"
    assert not stale_settings_from_config(_cfg()).enabled
    # Bounded by default (1 GiB besides the batch due); null lifts the limit.
    assert stale_settings_from_config(_cfg(staleness_updates=256)).ram_budget_bytes == 2**30
    assert stale_settings_from_config(_cfg(staleness_updates=256, ram_budget_gb=None)).ram_budget_bytes is None


@pytest.mark.parametrize(
    ("stale", "extra", "message"),
    [
        ({"staleness_updates": 12}, {}, "m2po.stale.staleness_updates=12 is not a multiple of the 8 model updates"),
        ({"ram_budget_gb": -1}, {}, "m2po.stale.ram_budget_gb must be > 0 or null"),
        ({"staleness_updates": 8}, {"trainer.critic_warmup": 2}, "trainer.critic_warmup must be 0"),
        ({"staleness_updates": 8}, {"algorithm.filter_groups.enable": True}, "filter_groups.enable=true"),
        ({"staleness_updates": 8, "behaviour_log_probs": "rollout"},
         {"actor_rollout_ref.rollout.calculate_log_probs": False},
         "needs actor_rollout_ref.rollout.calculate_log_probs=true"),
        ({"staleness_updates": 8}, {"trainer.use_v1": False}, "set trainer.use_v1=true"),
    ],
)
def test_bad_settings_name_the_key(stale, extra, message):
    cfg = _cfg(**stale)
    for key, value in extra.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        stale_settings_from_config(cfg)


def test_the_shipped_section_is_the_dataclass_defaults():
    """One default per setting: the YAML lists the keys (overridable without +), with the values of
    `StaleSectionConfig`."""
    shipped = OmegaConf.to_container(compose("m2po_trainer", []).m2po.stale)
    defaults = {name: getattr(StaleSectionConfig(), name) for name in StaleSectionConfig.__dataclass_fields__}
    assert shipped == defaults | {"_target_": "m2po.verl_integration.stale_settings.StaleSectionConfig"}


def test_unknown_and_mistyped_keys_are_refused_by_name():
    with pytest.raises(Exception, match="stale_updates"):
        stale_settings_from_config(_cfg(stale_updates=256))
    with pytest.raises(Exception, match="staleness_updates"):
        stale_settings_from_config(_cfg(staleness_updates="many"))


def _batch():
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    samples = [
        {
            "responses": torch.arange(2 + i, dtype=torch.int64) * 7,
            "routed_experts": torch.full((3 + i, 2), i, dtype=torch.int16),  # per-token, trailing dim
            "old_log_probs": torch.linspace(-1, 0, 2 + i),
            "scalar": torch.tensor(float(i) / 3),
            "raw_prompt": [{"role": "user", "content": f"q{i} \u00e9"}],
            "extra": {"arr": np.arange(3, dtype=np.int16) + i, "t": torch.tensor([1.5, i]), "none": None, "nan": float("nan")},
        }
        for i in range(3)
    ]
    return samples, list_of_dict_to_tensordict(samples)


def test_codec_round_trip_is_exact():
    samples, data = _batch()
    keys, tags = ["a_0_0", "b_0_0", "c_0_0"], [{"seq_len": 5, "is_padding": False}, {"seq_len": 6}, {"x": None}]
    flat = encode_batch(data, keys, tags)
    assert all(isinstance(t, torch.Tensor) for t in flat.values())
    got_keys, got_tags, got = decode_batch(flat)
    assert got_keys == keys and got_tags == tags
    for original, restored in zip(samples, got, strict=True):
        for field in ("responses", "routed_experts", "old_log_probs", "scalar"):
            assert restored[field].dtype == original[field].dtype and torch.equal(restored[field], original[field])
        assert restored["raw_prompt"] == original["raw_prompt"]
        extra = restored["extra"]
        assert extra["arr"].dtype == np.int16 and np.array_equal(extra["arr"], original["extra"]["arr"])
        assert torch.equal(extra["t"], original["extra"]["t"]) and extra["none"] is None and np.isnan(extra["nan"])


def test_packed_jagged_fields_encode_like_their_samples():
    """TransferQueue's packed jagged tensors are sliced, not unbound: the same bytes as concatenating
    the samples, also when the packed buffer holds more than the samples (offsets not from 0)."""
    buffer = torch.arange(24, dtype=torch.int16).reshape(12, 2)
    offsets = torch.tensor([2, 5, 9])  # samples = rows 2..4 and 5..8
    nested = torch.nested.nested_tensor_from_jagged(buffer, offsets=offsets)
    flat = encode_batch(TensorDict({"routed_experts": nested}, batch_size=[2]), ["b", "c"], [{}, {}])
    assert torch.equal(flat["jagged/routed_experts/values"], buffer[2:9])
    assert flat["jagged/routed_experts/lengths"].tolist() == [3, 4]
    assert flat["jagged/routed_experts/trailing_shape"].tolist() == [2]
    _, _, samples = decode_batch(flat)
    assert [s["routed_experts"].tolist() for s in samples] == [buffer[2:5].tolist(), buffer[5:9].tolist()]
    # A batch as verl builds it: the packed path gives exactly the concatenated samples.
    original, data = _batch()
    flat = encode_batch(data, ["a", "b", "c"], [{}, {}, {}])
    assert torch.equal(flat["jagged/routed_experts/values"], torch.cat([s["routed_experts"] for s in original]))


def test_codec_refuses_what_json_cannot_hold():
    data = TensorDict({"obj": NonTensorStack(object(), object())}, batch_size=[2])
    with pytest.raises(TypeError, match="field 'obj': cannot store a object in the stale buffer"):
        encode_batch(data, ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match="batch has 2 samples but 1 keys"):
        encode_batch(data, ["a"], [{}])


def test_import_verl_registers_the_stale_trainer_lazily():
    code = (
        "import sys, verl\n"
        "assert 'verl.trainer.ppo.v1' not in sys.modules and 'm2po.verl_integration.stale_trainer' not in sys.modules\n"
        "from verl.trainer.ppo.v1 import get_trainer_cls\n"
        "cls = get_trainer_cls('m2po_stale')\n"
        "from verl.trainer.ppo.v1 import PPOTrainerSync\n"
        "assert issubclass(cls, PPOTrainerSync) and get_trainer_cls('sync') is PPOTrainerSync\n"
        "print(cls.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("m2po.verl_integration.stale_trainer")


def test_samples_hash_is_the_set_of_trained_samples():
    import torch

    from m2po.verl_integration.ledger import samples_hash

    def sample(tokens, reward, uid):
        return {
            "input_ids": torch.tensor(tokens),
            "response_mask": torch.ones(len(tokens) - 1, dtype=torch.int64),
            "rm_scores": torch.tensor([0.0] * (len(tokens) - 2) + [reward]),
            "uid": uid,  # verl's per-run group id: not part of what was trained
            "metrics": {"generate_sequences": 0.1 * uid},
        }

    batch = [sample([1, 2, 3], 1.0, 0), sample([1, 2, 4], 0.0, 1), sample([5, 6, 7, 8], 0.0, 2)]
    reference = samples_hash(batch)
    assert samples_hash(batch[::-1]) == reference  # row order is verl's completion order
    assert samples_hash([sample([1, 2, 3], 1.0, 7), batch[1], batch[2]]) == reference
    assert samples_hash([sample([1, 2, 3], 0.0, 0), batch[1], batch[2]]) != reference  # reward
    assert samples_hash([sample([1, 2, 9], 1.0, 0), batch[1], batch[2]]) != reference  # tokens
    assert samples_hash(batch[:2]) != reference and samples_hash([batch[0], *batch]) != reference
