"""The stale buffer at scale: bounded RAM, background read-back, incremental checkpoints through the
store, lazy budgeted resume, pruning, and kill -9 at every file operation."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from m2po.buffer import CorruptCheckpointError, PolicyVersion, StaleRolloutBuffer, StalenessConfig, storage
from m2po.buffer import stale_buffer as stale_buffer_module
from m2po.utils.atomic_io import remove_directory
from tests.test_stale_buffer import make_batch, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sized_batch(i: int, nbytes: int) -> dict[str, torch.Tensor]:
    """A batch whose compact size is exactly `nbytes` (float32 values do not narrow)."""
    g = torch.Generator().manual_seed(i)
    return {"old_log_probs": torch.rand(nbytes // 4, generator=g)}


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (each storage once)."""
    storages = {}
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        storage_ = obj.untyped_storage()
        storages[storage_.data_ptr()] = storage_.nbytes()
    return sum(storages.values())


def unique_inodes(directory) -> set[int]:
    return {os.stat(os.path.join(d, f)).st_ino for d, _, files in os.walk(directory) for f in files}


# ------------------------------------------------------------------ RAM


def test_resident_bytes_never_exceed_the_budget_plus_the_next_batch_due(tmp_path):
    entry_bytes = storage.nbytes(storage.compact(make_batch(0))[0])
    budget = 3 * entry_bytes
    buffer = StaleRolloutBuffer(StalenessConfig(16, 2), ram_budget_bytes=budget, spill_dir=str(tmp_path))
    updates = 0
    for t in range(30):
        version = PolicyVersion(t, updates)
        for w in range(buffer.warmup_batches_needed()):
            buffer.push(make_batch(-1 - w), version)
            assert buffer.resident_bytes() <= budget + entry_bytes
        buffer.push(make_batch(t), version)
        assert buffer.resident_bytes() <= budget + entry_bytes
        assert buffer.pop_ready(version) is not None
        assert buffer.resident_bytes() <= budget + entry_bytes
        updates += 2
    buffer.close()
    # RAM is the oldest part of the queue (due first), filled back up to the budget after each pop.
    assert [e.resident for e in buffer._queue] == [True] * 4 + [False] * (len(buffer) - 4)


def test_a_spilled_batch_is_read_back_in_the_background_before_it_is_due(tmp_path, monkeypatch):
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path))
    log, updates = run(buffer, iterations=6)
    buffer.close()  # waits for the read-back of the next batch due
    assert buffer._queue[0].tensors is not None and not buffer._queue[1].resident

    def no_disk(*args, **kwargs):
        raise AssertionError("the pop waited for the disk")

    monkeypatch.setattr(stale_buffer_module, "load_tensors", no_disk)
    version = PolicyVersion(6, updates)
    buffer.push(make_batch(6), version)
    assert buffer.pop_ready(version).content_hash == buffer_hashes_of_uninterrupted_run(7)[6]


def buffer_hashes_of_uninterrupted_run(iterations: int) -> list[str]:
    log, _ = run(StaleRolloutBuffer(StalenessConfig(4, 1)), iterations=iterations)
    return [content for _, _, _, content in log]


def test_a_batch_changed_in_the_store_is_refused_when_due(tmp_path):
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path))
    _, updates = run(buffer, iterations=2)
    buffer.close()
    victim = buffer._queue[2]  # not resident: its next read is from disk
    data = bytearray(open(victim.store_path, "rb").read())
    data[-2] ^= 0xFF
    with open(victim.store_path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match its content hash"):
        run(buffer, iterations=4, start=2, updates=updates)
    # The refused batch is still queued (the run stops here and resumes from a checkpoint).
    assert buffer._queue[0] is victim


# ------------------------------------------------------------------ incremental checkpoints


def test_each_batch_is_written_once_and_later_checkpoints_link_it(tmp_path):
    entry_bytes = 4000
    config = StalenessConfig(6, 1)
    buffer = StaleRolloutBuffer(config, ram_budget_bytes=2 * entry_bytes, spill_dir=str(tmp_path / "store"))
    updates = 0

    def step(t):
        nonlocal updates
        version = PolicyVersion(t, updates)
        for w in range(buffer.warmup_batches_needed()):
            buffer.push(sized_batch(-1 - w, entry_bytes), version)
        buffer.push(sized_batch(t, entry_bytes), version)
        assert buffer.pop_ready(version) is not None
        updates += 1

    step(0)
    # 6 queued: those that did not fit the budget were written when pushed; the others only now.
    not_on_disk = sum(e.store_path is None for e in buffer._queue)
    assert 0 < not_on_disk < 6
    first = buffer.save(str(tmp_path / "ckpt_1"))
    assert first.entries == 6 and first.linked_entries == 6 and first.copied_entries == 0
    file_size = os.path.getsize(buffer._queue[0].store_path)
    assert first.written_bytes == not_on_disk * file_size
    step(1)
    step(2)
    second = buffer.save(str(tmp_path / "ckpt_3"))
    # Only the 2 batches pushed since the last checkpoint cost a write (and they were spilled on push).
    assert second.entries == 6 and second.written_bytes == 0
    shared = set(os.listdir(tmp_path / "ckpt_1")) & set(os.listdir(tmp_path / "ckpt_3")) - {"manifest.json"}
    assert len(shared) == 4
    for name in shared:  # the same file, not a copy
        assert os.stat(tmp_path / "ckpt_1" / name).st_ino == os.stat(tmp_path / "ckpt_3" / name).st_ino
    # Both checkpoints load with exactly what was queued at their time.
    for path in ("ckpt_1", "ckpt_3"):
        restored = StaleRolloutBuffer(config)
        restored.load(str(tmp_path / path))
        manifest = json.loads((tmp_path / path / "manifest.json").read_text())
        assert restored.content_hashes() == [e["content_hash"] for e in manifest["entries"]]


def test_save_writes_only_batches_not_yet_on_disk(tmp_path):
    # No RAM pressure: batches stay in RAM and are written at their first checkpoint only.
    buffer = StaleRolloutBuffer(StalenessConfig(8, 2), spill_dir=str(tmp_path / "store"))
    _, updates = run(buffer, iterations=3)
    first = buffer.save(str(tmp_path / "a"))
    assert first.entries == 4 and first.written_bytes > 0
    per_batch = first.written_bytes / 4
    _, updates = run(buffer, iterations=1, start=3, updates=updates)
    second = buffer.save(str(tmp_path / "b"))
    assert second.entries == 4 and second.linked_entries == 4
    assert second.written_bytes == pytest.approx(per_batch, rel=0.05)  # u/k of the queue: one batch


def test_unreferenced_batches_are_deleted(tmp_path):
    run_dir = tmp_path / "run"
    config = StalenessConfig(4, 1)
    buffer = StaleRolloutBuffer(config, ram_budget_bytes=0, spill_dir=str(run_dir / "store"))
    _, updates = run(buffer, iterations=3)
    buffer.save(str(run_dir / "ckpt_3"))
    _, updates = run(buffer, iterations=3, start=3, updates=updates)
    buffer.save(str(run_dir / "ckpt_6"))
    buffer.close()
    queued = {os.stat(e.store_path).st_ino for e in buffer._queue}
    at_3 = unique_inodes(run_dir / "ckpt_3")
    at_6 = unique_inodes(run_dir / "ckpt_6")
    # On disk: exactly the union of what the queue and the live checkpoints reference.
    assert unique_inodes(run_dir) == queued | at_3 | at_6
    remove_directory(str(run_dir / "ckpt_3"))  # the older checkpoint is pruned
    assert unique_inodes(run_dir) == queued | at_6
    run(buffer, iterations=6, start=6, updates=updates)  # everything in ckpt_6 has been trained since
    buffer.close()
    remove_directory(str(run_dir / "ckpt_6"))
    assert unique_inodes(run_dir) == {os.stat(e.store_path).st_ino for e in buffer._queue}
    assert len(os.listdir(run_dir / "store")) == len(buffer)


def test_a_store_on_another_filesystem_falls_back_to_copies(tmp_path, monkeypatch):
    def cannot_link(source, destination):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cannot_link)
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path / "store"))
    _, updates = run(buffer, iterations=3)
    report = buffer.save(str(tmp_path / "ckpt"))
    assert report.linked_entries == 0 and report.copied_entries == 4
    resumed = StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path / "store2"))
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.content_hashes() == buffer.content_hashes()
    assert run(resumed, 5, start=3, updates=updates) == run(buffer, 5, start=3, updates=updates)


# ------------------------------------------------------------------ lazy, budgeted resume


def test_resume_never_holds_more_than_the_budget_plus_one_entry(tmp_path, monkeypatch):
    # The case: budget 8,000 B, eight 4,000 B entries (the old load held 32,000 B at once).
    entry_bytes, budget = 4000, 8000
    config = StalenessConfig(8, 1)
    writer = StaleRolloutBuffer(config, spill_dir=str(tmp_path / "store_a"))
    for t in range(8):
        writer.push(sized_batch(t, entry_bytes), PolicyVersion(0, 0))
    writer.save(str(tmp_path / "ckpt"))
    expected = writer.content_hashes()
    del writer
    gc.collect()

    reader = StaleRolloutBuffer(config, ram_budget_bytes=budget, spill_dir=str(tmp_path / "store_b"))
    baseline = live_tensor_bytes()
    peaks = []
    real_load_tensors = stale_buffer_module.load_tensors

    def measured_load_tensors(path):
        tensors = real_load_tensors(path)
        peaks.append(live_tensor_bytes() - baseline)  # the buffer's entries + the one just read
        return tensors

    monkeypatch.setattr(stale_buffer_module, "load_tensors", measured_load_tensors)
    reader.load(str(tmp_path / "ckpt"))
    reader.close()
    assert len(peaks) >= 8
    assert max(peaks[:8]) <= budget + entry_bytes  # measured, not the buffer's own bookkeeping
    assert max(peaks[:8]) == budget + entry_bytes  # (and it does use the budget)
    assert reader.content_hashes() == expected
    # Afterwards, as in steady state: the budget's worth plus the next batch due (read back).
    assert reader.resident_bytes() == budget + entry_bytes


# ------------------------------------------------------------------ kill -9


def crash_outcomes(scenario: str, tmp_path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.stale_buffer_crashes", scenario, str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_during_save_or_pruning_always_leaves_an_exact_checkpoint(tmp_path):
    report = crash_outcomes("save_and_prune", tmp_path)
    outcomes = report["outcomes"]
    assert report["operations"] >= 15 and len(outcomes) == report["operations"] + 1
    assert all(o["killed"] for o in outcomes[:-1]) and not outcomes[-1]["killed"]
    for o in outcomes:
        # Whatever is found under a checkpoint's name loads with exactly its content (a partial
        # directory would be refused by name; none is left).
        assert o["step_5"] in ("loads", "absent") and o["step_7"] in ("loads", "absent"), o
        assert o["step_5_exact"] in (True, None) and o["step_7_exact"] in (True, None), o
        assert "loads" in (o["step_5"], o["step_7"]), o  # a resumable checkpoint always exists
    # Step 7 appears at one crash point and stays; step 5 goes only after step 7 is complete.
    first_7 = next(i for i, o in enumerate(outcomes) if o["step_7"] == "loads")
    assert all(o["step_7"] == "loads" for o in outcomes[first_7:])
    assert all(o["step_5"] == "loads" for o in outcomes[: first_7 + 1])
    assert outcomes[-1]["step_5"] == "absent"


def test_kill_during_resume_leaves_the_checkpoint_loadable_and_the_run_exact(tmp_path):
    report = crash_outcomes("resume", tmp_path)
    assert report["operations"] >= 4
    for o in report["outcomes"]:
        assert o["step_7"] == "loads" and o["step_7_exact"] and o["continues_exactly"], o


def test_a_partially_written_checkpoint_is_refused_with_the_reason(tmp_path):
    buffer = StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path / "store"))
    run(buffer, iterations=3)
    buffer.save(str(tmp_path / "ckpt"))
    victim = sorted(f for f in os.listdir(tmp_path / "ckpt") if f.startswith("entry-"))[1]
    os.remove(tmp_path / "ckpt" / victim)  # e.g. a copy of the run folder interrupted half-way
    with pytest.raises(CorruptCheckpointError, match=f"incomplete stale-buffer checkpoint: .*{victim} is missing"):
        StaleRolloutBuffer(StalenessConfig(4, 1), ram_budget_bytes=0, spill_dir=str(tmp_path / "s2")).load(
            str(tmp_path / "ckpt")
        )
