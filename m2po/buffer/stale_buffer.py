"""The staleness-aware rollout buffer: a FIFO that delays every batch by exactly k model updates.

Plain PyTorch (no verl import), shared by verl's trainer integration and the CPU testbed. With
d = k / u (u = model updates per training iteration), one training iteration does:

    for _ in range(buffer.warmup_batches_needed()):      # paper warm-up: first iteration only
        buffer.push(rollouts_of_current_policy(fresh prompts), version)
    buffer.push(rollouts_of_current_policy, version)     # behaviour log-probs recorded now
    item = buffer.pop_ready(version)
    if item is not None:  train on item.batch (generated item.staleness_updates updates ago)
    else:                 generate only, no update ("fill_queue" warm-up)

The FIFO pops once more than d batches wait. "base_policy" (paper) puts d base-policy batches in
front at the first iteration, so training starts at once on base-policy rollouts (staleness 0, u,
..., k - u) and every later batch is exactly k updates stale; "fill_queue" (authors' code) has no
extra batches and instead spends the first d iterations generating without training. Neither
needs the base policy's weights after the first iteration.

Memory and disk (sized for the paper's s=256: 64 queued batches of 2048 x 4k tokens):
- Entries are stored compactly (narrowed integers). With a store directory (`spill_dir`), at most
  `ram_budget_bytes` of them stay in RAM, the oldest (due first), plus the next batch due; the
  rest live in the store, one safetensors file per batch, written once. After each pop, a
  background thread reads the next ones due back into RAM, so a pop rarely waits for the disk.
- `save` is incremental: a batch already in the store is hard-linked into the checkpoint, so a
  checkpoint writes only the batches not yet on disk (those pushed since the last checkpoint that
  are still in RAM). A popped batch leaves the store; its disk space is freed when the last
  checkpoint linking it is removed. Checkpoints stay self-contained directories.
- `load` is lazy and budgeted: entries are read and verified against their content hash one at a
  time, linked back into the store, and only the oldest that fit the budget are kept in RAM.
- Every file and checkpoint directory is written atomically; a crash at any point leaves each
  checkpoint loadable or refused with the reason (tests kill the process at every file operation).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from m2po.buffer.config import WARMUP_BASE_POLICY, PolicyVersion, StalenessConfig
from m2po.buffer.storage import (
    Batch,
    CorruptCheckpointError,
    atomic_save_tensors,
    compact,
    content_hash,
    load_tensors,
    nbytes,
    read_json,
    restore,
)
from m2po.utils.atomic_io import atomic_directory, atomic_write_bytes, fsync_dir, link_or_copy

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class _Entry:
    entry_id: int
    version: PolicyVersion
    content_hash: str
    dtypes: dict[str, str]
    nbytes: int
    tensors: dict[str, torch.Tensor] | None  # the compact tensors while in RAM
    store_path: str | None = None  # its file in the store, once written (never rewritten)
    pending: Future | None = None  # a background read of store_path back into RAM

    @property
    def file_name(self) -> str:
        return f"entry-{self.entry_id:08d}.safetensors"

    @property
    def store_name(self) -> str:
        return f"entry-{self.entry_id:08d}-{self.content_hash[:16]}.safetensors"

    @property
    def resident(self) -> bool:
        return self.tensors is not None or self.pending is not None


@dataclass(frozen=True)
class ReadyBatch:
    """A batch popped for training."""

    batch: dict[str, torch.Tensor]
    version: PolicyVersion  # the policy that generated it
    staleness_updates: int  # model updates between generation and this training step
    content_hash: str


@dataclass(frozen=True)
class SaveReport:
    """What one `save` cost: bytes written, and entries hard-linked or copied from the store."""

    entries: int
    written_bytes: int
    linked_entries: int
    copied_entries: int


def _read_verified(path: str, dtypes: dict[str, str], expected_hash: str, what: str) -> dict[str, torch.Tensor]:
    """The compact tensors of an entry file, checked against the batch's content hash."""
    tensors = load_tensors(path)
    if set(tensors) != set(dtypes) or content_hash(tensors, dtypes) != expected_hash:
        raise CorruptCheckpointError(f"{what} ({path}) does not match its content hash")
    return tensors


class StaleRolloutBuffer:
    """FIFO of rollout batches, each trained exactly `config.staleness_updates` updates after
    the policy that generated it (after warm-up; see module docstring).

    Args:
        config: staleness and warm-up.
        ram_budget_bytes: compact bytes of queued batches kept in RAM, besides the next batch
            due; the newer ones live in `spill_dir`. None = no limit.
        spill_dir: the store, a directory owned by the buffer (emptied of entry files at start:
            checkpoints hold their own links). Needed for a RAM budget and for incremental saves;
            without it, everything stays in RAM and every save writes every batch.
        required_fields: fields every pushed batch must have (e.g. the behaviour log-probs).
    """

    def __init__(
        self,
        config: StalenessConfig,
        ram_budget_bytes: int | None = None,
        spill_dir: str | None = None,
        required_fields: tuple[str, ...] = (),
    ):
        if ram_budget_bytes is not None and ram_budget_bytes < 0:
            raise ValueError(f"ram_budget_bytes must be >= 0 or None, got {ram_budget_bytes}")
        if ram_budget_bytes is not None and spill_dir is None:
            raise ValueError("a RAM budget needs a spill_dir for the entries beyond it")
        self.config = config
        self.ram_budget_bytes = ram_budget_bytes
        self.spill_dir = spill_dir
        self.required_fields = tuple(required_fields)
        self._queue: deque[_Entry] = deque()
        self._next_id = 0
        self._last_staleness: int | None = None
        self._reader: ThreadPoolExecutor | None = None
        if spill_dir is not None:
            os.makedirs(spill_dir, exist_ok=True)
            for stale_file in glob.glob(os.path.join(spill_dir, "entry-*.safetensors*")):
                os.remove(stale_file)

    # ------------------------------------------------------------------ FIFO

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, batch: Batch, version: PolicyVersion) -> str:
        """Store rollouts generated by `version`; returns their content hash."""
        missing = [name for name in self.required_fields if name not in batch]
        if missing:
            raise KeyError(f"batch lacks required fields {missing}; it has {sorted(batch)}")
        if self._queue and version.updates < self._queue[-1].version.updates:
            raise ValueError(
                f"policy versions must not go backwards: pushing {version} after {self._queue[-1].version}"
            )
        tensors, dtypes = compact(batch)
        entry = _Entry(self._next_id, version, content_hash(batch), dtypes, nbytes(tensors), tensors)
        self._next_id += 1
        self._queue.append(entry)
        self._enforce_budget()
        return entry.content_hash

    def warmup_batches_needed(self) -> int:
        """Base-policy batches to push before the first regular one ("base_policy" warm-up): d on
        the very first iteration, 0 otherwise and always 0 for "fill_queue"."""
        if self.config.warmup == WARMUP_BASE_POLICY and self._next_id == 0:
            return self.config.delay_iterations
        return 0

    def pop_ready(self, current: PolicyVersion) -> ReadyBatch | None:
        """The oldest batch if it is due for training at `current` (more than d batches wait),
        else None.

        Raises:
            RuntimeError: the oldest batch is older than the configured staleness, i.e. the
                trainer did not consume a batch when it was due (updates per iteration changed,
                or push/pop were not called once per iteration).
            CorruptCheckpointError: a batch read back from the store changed on disk.
        """
        if not self._queue:
            return None
        oldest = self._queue[0]
        age = current.updates - oldest.version.updates
        k = self.config.staleness_updates
        if age > k:
            raise RuntimeError(
                f"stale buffer overshoot: the oldest batch was generated at {oldest.version}, "
                f"{age} updates before {current}, but staleness is {k}; was a due batch not consumed?"
            )
        if len(self._queue) <= self.config.delay_iterations:
            return None
        tensors = self._take_tensors(oldest)  # before the pop: a refused read leaves the queue as it was
        self._queue.popleft()
        if oldest.store_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(oldest.store_path)  # checkpoints that hold it keep their own link
        self._last_staleness = age
        self._prefetch()
        return ReadyBatch(
            batch=restore(tensors, oldest.dtypes), version=oldest.version, staleness_updates=age,
            content_hash=oldest.content_hash,
        )

    def metrics(self) -> dict[str, float]:
        """Per-step metrics (logged under `stale/`)."""
        stored = [e for e in self._queue if e.store_path is not None]
        return {
            "stale/staleness_updates": float(self._last_staleness) if self._last_staleness is not None else -1.0,
            "stale/target_staleness_updates": float(self.config.staleness_updates),
            "stale/buffer_len": float(len(self._queue)),
            "stale/ram_bytes": float(self.resident_bytes()),
            "stale/disk_bytes": float(sum(os.path.getsize(e.store_path) for e in stored)),
            "stale/spilled_entries": float(sum(not e.resident for e in self._queue)),
            "stale/stored_entries": float(len(stored)),
        }

    def resident_bytes(self) -> int:
        """Compact bytes of queued batches held in RAM (or being read back into it)."""
        return sum(e.nbytes for e in self._queue if e.resident)

    # ------------------------------------------------------------------ RAM budget

    def _enforce_budget(self) -> None:
        """Keep at most the budget in RAM besides the next batch due; the newest go to the store
        first (they are due last)."""
        if self.ram_budget_bytes is None:
            return
        tail_bytes = sum(e.nbytes for e in list(self._queue)[1:] if e.resident)
        for entry in reversed(list(self._queue)[1:]):
            if tail_bytes <= self.ram_budget_bytes:
                break
            if entry.resident:
                self._evict(entry)
                tail_bytes -= entry.nbytes

    def _evict(self, entry: _Entry) -> None:
        if entry.pending is not None:
            if not entry.pending.cancel():
                entry.pending.exception()  # already reading: let it finish (its file stays)
            entry.pending = None
        self._write_to_store(entry)  # a no-op for entries read back from the store
        entry.tensors = None

    def _write_to_store(self, entry: _Entry) -> int:
        """Write an entry's file into the store unless it is there already; returns bytes written."""
        if entry.store_path is not None:
            return 0
        path = os.path.join(self.spill_dir, entry.store_name)
        atomic_save_tensors(path, entry.tensors, metadata={})
        entry.store_path = path
        return os.path.getsize(path)

    def _prefetch(self) -> None:
        """Read back, in the background, the next batch due and then the oldest stored ones that fit
        the budget, so that RAM holds a prefix of the queue."""
        if self.spill_dir is None:
            return
        budget = math.inf if self.ram_budget_bytes is None else self.ram_budget_bytes
        tail_bytes = 0
        for position, entry in enumerate(self._queue):
            if position > 0:
                if tail_bytes + entry.nbytes > budget:
                    break
                tail_bytes += entry.nbytes
            if not entry.resident:
                if self._reader is None:
                    self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2po-stale-prefetch")
                entry.pending = self._reader.submit(
                    _read_verified, entry.store_path, entry.dtypes, entry.content_hash, self._describe(entry)
                )

    def _take_tensors(self, entry: _Entry) -> dict[str, torch.Tensor]:
        """The entry's compact tensors (see `_ram_tensors`), which the entry no longer holds."""
        tensors, entry.tensors = self._ram_tensors(entry), None
        return tensors

    def _describe(self, entry: _Entry) -> str:
        return f"stale buffer entry {entry.entry_id} ({entry.version})"

    def _settle(self) -> None:
        """Wait for background reads (before the queue is replaced or files are moved)."""
        for entry in self._queue:
            if entry.pending is not None:
                try:
                    entry.tensors = entry.pending.result()
                except CorruptCheckpointError:
                    entry.tensors = None  # reported again when the entry is due
                entry.pending = None

    def close(self) -> None:
        """Stop the background reader (a buffer is usable again afterwards; it restarts on demand)."""
        self._settle()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._reader = None

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str) -> SaveReport:
        """Write the buffer to `directory` atomically (all or nothing).

        With a store, each batch's file is written there once and hard-linked into the checkpoint
        (copied where the filesystem cannot link), so a save writes only the batches not yet on
        disk. Without one, every batch is written.
        """
        written = linked = copied = 0
        with atomic_directory(directory) as tmp_dir:
            entries = []
            for entry in self._queue:
                path = os.path.join(tmp_dir, entry.file_name)
                if self.spill_dir is None:
                    atomic_save_tensors(path, self._ram_tensors(entry), metadata={})
                    written += os.path.getsize(path)
                else:
                    written += self._write_to_store(entry)  # only batches not on disk yet (in RAM)
                    if link_or_copy(entry.store_path, path):
                        linked += 1
                    else:
                        copied += 1
                        written += os.path.getsize(path)
                entries.append(
                    {
                        "id": entry.entry_id,
                        "file": entry.file_name,
                        "version": entry.version.to_json(),
                        "content_hash": entry.content_hash,
                        "dtypes": entry.dtypes,
                        "nbytes": entry.nbytes,
                    }
                )
            manifest = {
                "format": FORMAT_VERSION,
                "config": self.config.to_json(),
                "next_id": self._next_id,
                "last_staleness": self._last_staleness,
                "entries": entries,
            }
            atomic_write_bytes(os.path.join(tmp_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
        return SaveReport(len(entries), written, linked, copied)

    def _ram_tensors(self, entry: _Entry) -> dict[str, torch.Tensor]:
        """The entry's compact tensors: from RAM, from its background read, or from the store now
        (not kept). What comes from disk is verified against the content hash; RAM entries never
        changed."""
        if entry.pending is not None:
            entry.tensors, entry.pending = entry.pending.result(), None
        if entry.tensors is None:  # only stored entries are not in RAM
            return _read_verified(entry.store_path, entry.dtypes, entry.content_hash, self._describe(entry))
        return entry.tensors

    def load(self, directory: str) -> None:
        """Replace this buffer's contents with a saved one.

        Entries are read and verified one at a time; with a store, each is linked into it (no
        rewrite) and kept in RAM only while the budget allows (oldest first), so loading never
        holds more than the budget plus the entry being verified. The next batch due is then read
        back in the background.

        Raises:
            CorruptCheckpointError: missing manifest or entry file, unreadable file, or a
                content hash that does not match.
            ValueError: the checkpoint was saved with a different staleness configuration.
        """
        manifest_path = os.path.join(directory, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise CorruptCheckpointError(f"incomplete stale-buffer checkpoint: {manifest_path} is missing")
        manifest = read_json(manifest_path)
        if manifest.get("format") != FORMAT_VERSION:
            raise CorruptCheckpointError(f"{manifest_path}: unknown format {manifest.get('format')!r}")
        if manifest["config"] != self.config.to_json():
            raise ValueError(
                f"stale-buffer checkpoint {directory} was saved with {manifest['config']}, but this run is "
                f"configured with {self.config.to_json()}; resume with the same staleness settings"
            )
        self._settle()
        for entry in self._queue:
            if entry.store_path is not None and os.path.exists(entry.store_path):
                os.remove(entry.store_path)
        self._queue = deque()
        budget = math.inf if self.ram_budget_bytes is None else self.ram_budget_bytes
        in_ram_bytes, in_ram_prefix = 0, True
        for record in manifest["entries"]:
            path = os.path.join(directory, record["file"])
            if not os.path.isfile(path):
                raise CorruptCheckpointError(f"incomplete stale-buffer checkpoint: {path} is missing")
            tensors = _read_verified(path, record["dtypes"], record["content_hash"], "stale-buffer checkpoint entry")
            entry = _Entry(
                record["id"], PolicyVersion(**record["version"]), record["content_hash"], record["dtypes"],
                nbytes(tensors), tensors,
            )
            if self.spill_dir is not None:
                store_path = os.path.join(self.spill_dir, entry.store_name)
                if os.path.exists(store_path):
                    os.remove(store_path)
                link_or_copy(path, store_path)
                entry.store_path = store_path
                in_ram_prefix = in_ram_prefix and in_ram_bytes + entry.nbytes <= budget
                if in_ram_prefix:
                    in_ram_bytes += entry.nbytes
                else:
                    entry.tensors = None
            self._queue.append(entry)
            del tensors
        if self.spill_dir is not None:
            fsync_dir(self.spill_dir)
        self._next_id = manifest["next_id"]
        self._last_staleness = manifest["last_staleness"]
        self._prefetch()

    def content_hashes(self) -> list[str]:
        """Hashes of the queued batches, oldest first."""
        return [e.content_hash for e in self._queue]

