"""Staleness-aware rollout buffer: exact delay, warm-up modes, compact storage, spill, persistence."""

from __future__ import annotations

import os

import pytest
import torch

from m2po.buffer import CorruptCheckpointError, PolicyVersion, StaleRolloutBuffer, StalenessConfig, content_hash
from m2po.buffer import storage


def make_batch(i: int, batch: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "input_ids": torch.randint(0, 150_000, (batch, length), generator=g),  # int64 token ids
        "response_mask": torch.rand(batch, length, generator=g) > 0.3,
        "old_log_probs": -torch.rand(batch, length, generator=g),
        "advantages": torch.randn(batch, length, generator=g),
        "index": torch.full((batch,), i, dtype=torch.int64),
    }


def run(buffer: StaleRolloutBuffer, iterations: int, start: int = 0, updates: int = 0):
    """The trainer loop of the module docstring; returns what each iteration trained on.
    Batch ids: iteration t generates batch t; paper warm-up batches get ids -1, -2, ..."""
    u = buffer.config.updates_per_iteration
    log = []
    for t in range(start, start + iterations):
        version = PolicyVersion(global_step=t, updates=updates)
        for w in range(buffer.warmup_batches_needed()):
            buffer.push(make_batch(-1 - w), version)
        buffer.push(make_batch(t), version)
        item = buffer.pop_ready(version)
        if item is not None:
            log.append(("train", int(item.batch["index"][0]), item.staleness_updates, item.content_hash))
            updates += u
        else:
            log.append(("generate-only", None, None, None))
    return log, updates


@pytest.mark.parametrize("k, u", [(0, 1), (0, 4), (4, 4), (8, 4), (12, 2), (256, 4), (6, 3)])
def test_paper_warmup_trains_every_batch_exactly_k_updates_later(k, u):
    buffer = StaleRolloutBuffer(StalenessConfig(k, u, "base_policy"))
    d = k // u
    log, _ = run(buffer, iterations=d + 10)
    # Warm-up: the d base-policy batches (fresh prompts), staleness t*u < k, trained from the
    # first iteration on; afterwards batch t-d, exactly k updates stale.
    assert [(src, idx, stale) for src, idx, stale, _ in log[:d]] == [("train", -1 - t, t * u) for t in range(d)]
    assert [(src, idx, stale) for src, idx, stale, _ in log[d:]] == [("train", t - d, k) for t in range(d, d + 10)]
    assert len(buffer) == d  # the d newest wait for their turn


@pytest.mark.parametrize("k, u", [(0, 1), (4, 4), (8, 4), (12, 2)])
def test_authors_warmup_generates_until_the_queue_is_full(k, u):
    buffer = StaleRolloutBuffer(StalenessConfig(k, u, "fill_queue"))
    d = k // u
    log, _ = run(buffer, iterations=3 * d + 5)
    assert log[:d] == [("generate-only", None, None, None)] * d
    trained = [(idx, stale) for src, idx, stale, _ in log[d:]]
    # FIFO order; staleness ramps 0, u, ..., k-u over the base-policy batches, then exactly k.
    assert [idx for idx, _ in trained] == list(range(len(trained)))
    assert [stale for _, stale in trained] == [min(j * u, k) for j in range(len(trained))]


def test_version_tags_and_content_hashes_survive_the_queue():
    buffer = StaleRolloutBuffer(StalenessConfig(2, 1))
    buffer.push(make_batch(0), PolicyVersion(global_step=7, updates=10))
    buffer.push(make_batch(1), PolicyVersion(global_step=8, updates=11))
    assert buffer.pop_ready(PolicyVersion(global_step=8, updates=11)) is None  # only d=2 waiting
    buffer.push(make_batch(2), PolicyVersion(global_step=9, updates=12))
    item = buffer.pop_ready(PolicyVersion(global_step=9, updates=12))
    assert item.version == PolicyVersion(7, 10) and item.staleness_updates == 2
    assert item.content_hash == content_hash(make_batch(0))


def test_missing_a_due_batch_is_an_error_not_silent_extra_staleness():
    buffer = StaleRolloutBuffer(StalenessConfig(4, 4))
    buffer.push(make_batch(0), PolicyVersion(0, 0))
    with pytest.raises(RuntimeError, match="overshoot.*8 updates.*staleness is 4"):
        buffer.pop_ready(PolicyVersion(2, 8))


def test_versions_must_not_go_backwards():
    buffer = StaleRolloutBuffer(StalenessConfig(4, 4))
    buffer.push(make_batch(0), PolicyVersion(1, 4))
    with pytest.raises(ValueError, match="must not go backwards"):
        buffer.push(make_batch(1), PolicyVersion(0, 0))


def test_required_fields_are_enforced():
    buffer = StaleRolloutBuffer(StalenessConfig(0, 1), required_fields=("old_log_probs",))
    batch = make_batch(0)
    del batch["old_log_probs"]
    with pytest.raises(KeyError, match="old_log_probs"):
        buffer.push(batch, PolicyVersion(0, 0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(staleness_updates=10, updates_per_iteration=4), r"staleness_updates=10 is not a multiple of the 4 .* 8 and 12"),
        (dict(staleness_updates=-4, updates_per_iteration=4), "must be >= 0"),
        (dict(staleness_updates=4, updates_per_iteration=0), "updates_per_iteration must be >= 1"),
        (dict(staleness_updates=4.0, updates_per_iteration=4), "must be an integer"),
        (dict(staleness_updates=4, updates_per_iteration=4, warmup="paper"), r"warmup must be one of \['base_policy', 'fill_queue'\]"),
    ],
)
def test_bad_staleness_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StalenessConfig(**kwargs)


def test_storage_is_compact_and_bit_identical():
    batch = make_batch(3)
    batch["special"] = torch.tensor([float("nan"), -0.0, float("inf"), 1e-45])
    batch["small_ids"] = torch.tensor([0, 17, 255])
    buffer = StaleRolloutBuffer(StalenessConfig(0, 1))
    buffer.push(batch, PolicyVersion(0, 0))
    stored = buffer._queue[0].tensors
    assert stored["input_ids"].dtype == torch.int32 and stored["small_ids"].dtype == torch.uint8
    assert stored["index"].dtype == torch.uint8
    original_bytes = sum(t.numel() * t.element_size() for t in batch.values())
    assert buffer._queue[0].nbytes < 0.75 * original_bytes
    item = buffer.pop_ready(PolicyVersion(0, 0))
    for name, tensor in batch.items():
        assert item.batch[name].dtype == tensor.dtype
        assert torch.equal(item.batch[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_spills_beyond_the_ram_budget_and_reads_back_identically(tmp_path):
    entry_bytes = storage.nbytes(storage.compact(make_batch(0))[0])
    budget = 2 * entry_bytes
    buffer = StaleRolloutBuffer(StalenessConfig(6, 1), ram_budget_bytes=budget, spill_dir=str(tmp_path / "spill"))
    reference = StaleRolloutBuffer(StalenessConfig(6, 1))
    log, updates = run(buffer, iterations=6)
    buffer.close()  # let the background reads finish before counting
    metrics = buffer.metrics()
    # RAM: the next batch due plus the budget's worth of the following ones; the rest on disk.
    assert metrics["stale/ram_bytes"] == budget + entry_bytes
    assert metrics["stale/spilled_entries"] == len(buffer) - 3 > 0 and metrics["stale/disk_bytes"] > 0
    assert len(os.listdir(tmp_path / "spill")) == metrics["stale/stored_entries"] >= len(buffer) - 3
    # RAM holds the oldest (due first); spilled ones come back bit-identical (log below).
    assert [e.resident for e in buffer._queue] == [True] * 3 + [False] * (len(buffer) - 3)
    more, _ = run(buffer, iterations=10, start=6, updates=updates)
    ref_log, _ = run(reference, iterations=16)
    assert log + more == ref_log
    assert buffer.metrics()["stale/ram_bytes"] <= budget + entry_bytes


def test_zero_budget_keeps_only_the_next_batch_due(tmp_path):
    buffer = StaleRolloutBuffer(StalenessConfig(2, 1, "fill_queue"), ram_budget_bytes=0, spill_dir=str(tmp_path))
    log, _ = run(buffer, iterations=7)
    buffer.close()
    assert [e.resident for e in buffer._queue] == [True, False]
    assert buffer.metrics()["stale/ram_bytes"] == buffer._queue[0].nbytes
    assert [stale for _, _, stale, _ in log] == [None, None, 0, 1, 2, 2, 2]


def test_budget_needs_a_spill_dir():
    with pytest.raises(ValueError, match="spill_dir"):
        StaleRolloutBuffer(StalenessConfig(2, 1), ram_budget_bytes=10)


@pytest.mark.parametrize("warmup", ["base_policy", "fill_queue"])
@pytest.mark.parametrize("budget", [None, 1])
def test_save_and_resume_trains_the_same_sequence_as_an_uninterrupted_run(tmp_path, warmup, budget):
    config = StalenessConfig(8, 2, warmup)
    spill = dict(ram_budget_bytes=budget, spill_dir=str(tmp_path / "spill") if budget is not None else None)
    uninterrupted, _ = run(StaleRolloutBuffer(config), iterations=20)

    first = StaleRolloutBuffer(config, **spill)
    log_a, updates = run(first, iterations=7)
    first.save(str(tmp_path / "ckpt" / "stale_buffer"))
    del first  # the process dies; a new one resumes from the checkpoint

    resumed = StaleRolloutBuffer(config, **spill)
    resumed.load(str(tmp_path / "ckpt" / "stale_buffer"))
    log_b, _ = run(resumed, iterations=13, start=7, updates=updates)
    assert log_a + log_b == uninterrupted  # nothing lost, nothing duplicated, same content hashes


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    config = StalenessConfig(4, 1)
    buffer = StaleRolloutBuffer(config)
    _, updates = run(buffer, iterations=3)
    target = str(tmp_path / "stale_buffer")
    buffer.save(target)
    saved_hashes = buffer.content_hashes()
    run(buffer, iterations=2, start=3, updates=updates)
    assert buffer.content_hashes() != saved_hashes

    def crash(*args, **kwargs):
        raise OSError("disk full / killed while writing the manifest")

    monkeypatch.setattr("m2po.buffer.stale_buffer.atomic_write_bytes", crash)
    with pytest.raises(OSError):
        buffer.save(target)
    monkeypatch.undo()

    restored = StaleRolloutBuffer(config)
    restored.load(target)
    assert restored.content_hashes() == saved_hashes


def _saved(tmp_path):
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1))
    run(buffer, iterations=4)
    path = str(tmp_path / "stale_buffer")
    buffer.save(path)
    files = sorted(f for f in os.listdir(path) if f.startswith("entry-"))
    return path, files


def test_flipped_byte_is_detected(tmp_path):
    path, files = _saved(tmp_path)
    entry = os.path.join(path, files[1])
    data = bytearray(open(entry, "rb").read())
    data[-3] ^= 0xFF  # inside the tensor data
    open(entry, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match its content hash"):
        StaleRolloutBuffer(StalenessConfig(4, 1)).load(path)


@pytest.mark.parametrize("damage", ["truncate", "delete_entry", "delete_manifest", "garble_manifest"])
def test_partial_or_damaged_checkpoint_is_reported(tmp_path, damage):
    path, files = _saved(tmp_path)
    entry = os.path.join(path, files[0])
    manifest = os.path.join(path, "manifest.json")
    if damage == "truncate":
        open(entry, "r+b").truncate(40)
    elif damage == "delete_entry":
        os.remove(entry)
    elif damage == "delete_manifest":
        os.remove(manifest)
    else:
        open(manifest, "w").write('{"format": 1, "entr')
    with pytest.raises(CorruptCheckpointError):
        StaleRolloutBuffer(StalenessConfig(4, 1)).load(path)


def test_resume_with_other_staleness_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match="saved with .*'staleness_updates': 4.* configured with .*'staleness_updates': 8"):
        StaleRolloutBuffer(StalenessConfig(8, 1)).load(path)


def test_leftovers_of_a_crashed_save_are_cleaned_up(tmp_path):
    path, _ = _saved(tmp_path)
    os.makedirs(path + ".tmp-99999")  # another process died mid-save
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1))
    buffer.load(path)
    buffer.save(path)
    assert sorted(os.listdir(tmp_path)) == ["stale_buffer"]
