"""The staleness bookkeeping of the asynchronous trainers (pure functions; the trainers themselves
run end to end in tests/test_cpu_e2e.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from m2po.verl_integration.async_trainers import sample_staleness, updates_per_local_step
from m2po.verl_integration.ledger import staleness_metrics, staleness_summary


def _config(train_batch_size, mini_batch, epochs=1):
    return OmegaConf.create(
        {
            "data": {"train_batch_size": train_batch_size},
            "actor_rollout_ref": {"actor": {"ppo_mini_batch_size": mini_batch, "ppo_epochs": epochs}},
        }
    )


@pytest.mark.parametrize(
    ("train_batch_size", "mini_batch", "epochs", "sync_step", "expected"),
    [
        (256, 64, 1, 4, 1),  # the paper's separate_async scripts: one update per local step
        (256, 64, 2, 4, 2),
        (256, 64, 1, 1, 4),  # colocate_async: one sample of the whole batch, u = 4 updates
        (8, 2, 3, 1, 12),
    ],
)
def test_updates_per_local_step(train_batch_size, mini_batch, epochs, sync_step, expected):
    assert updates_per_local_step(_config(train_batch_size, mini_batch, epochs), sync_step) == expected


def test_sample_staleness_uses_the_oldest_generating_weights_and_skips_padding():
    tags = [
        {"min_global_steps": 2, "max_global_steps": 2},
        {"min_global_steps": 1, "max_global_steps": 3},  # partial rollout across versions 1..3
        {"min_global_steps": 0, "max_global_steps": 0, "is_padding": True},
    ]
    # 13 updates done; version v was synced after 4v updates
    assert sample_staleness(tags, updates_done=13, updates_per_version=4) == [13 - 8, 13 - 4]


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=50))
def test_staleness_summary_is_min_mean_max(values):
    summary = staleness_summary(values)
    assert summary == {
        "staleness_updates_min": float(min(values)),
        "staleness_updates_mean": sum(values) / len(values),
        "staleness_updates_max": float(max(values)),
    }
    assert staleness_metrics(summary) == {f"stale/{key}": value for key, value in summary.items()}


def test_staleness_summary_of_an_empty_batch_is_zero():
    assert set(staleness_summary([]).values()) == {0.0}
