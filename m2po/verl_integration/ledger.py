"""The staleness ledger: one JSON line per trained batch, written by our stale@k and async trainers.

`<trainer.default_local_dir>/m2po_stale_ledger.jsonl`. Every record has the training step, the
staleness of the trained samples in actor updates (`staleness_updates_min`, `_mean`, `_max`: for
stale@k all three equal k) and what identifies the samples, so a stale@k run and an asynchronous run
can be compared on the same axis, and a resumed run audited against an uninterrupted one. Plain
Python and torch (no verl import); appends survive a crash mid-line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import torch

LEDGER_FILE = "m2po_stale_ledger.jsonl"


def staleness_summary(staleness_updates: Sequence[float]) -> dict[str, float]:
    """`staleness_updates_min`, `_mean`, `_max` over a batch's samples (all 0.0 for an empty batch)."""
    values = [float(value) for value in staleness_updates] or [0.0]
    return {
        "staleness_updates_min": min(values),
        "staleness_updates_mean": sum(values) / len(values),
        "staleness_updates_max": max(values),
    }


def staleness_metrics(summary: dict[str, float]) -> dict[str, float]:
    """A `staleness_summary` as `stale/*` metrics, the same names in every trainer of ours."""
    return {f"stale/{name}": value for name, value in summary.items()}


SAMPLE_HASH_FIELDS = ("input_ids", "response_mask", "rm_scores")


def samples_hash(samples: list[dict]) -> str:
    """Hash of what was trained: the set of samples, each its tokens, response mask and reward.

    Unlike `content_hash` (every stored field, in storage order, for integrity), it leaves out
    verl's per-run bookkeeping (prompt-group uuids, timings, request ids) and the row order, which
    in verl's v1 trainer is the order in which rollouts finished. Two runs that trained the same
    samples at a step have the same `samples_hash` there."""
    per_sample = []
    for sample in samples:
        digest = hashlib.sha256()
        for field in SAMPLE_HASH_FIELDS:
            value = sample.get(field)
            if isinstance(value, torch.Tensor):
                digest.update(field.encode())
                digest.update(value.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        per_sample.append(digest.hexdigest())
    return hashlib.sha256("\n".join(sorted(per_sample)).encode()).hexdigest()


def append_ledger_record(path: str, record: dict) -> None:
    """Append one JSON line. A line cut by a crash (no trailing newline) is closed first, so the
    new record never merges into it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    line = json.dumps(record).encode() + b"\n"
    with open(path, "ab+") as f:  # appends go to the end whatever the read position
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def read_ledger(path: str, key: str = "global_step") -> dict[int, dict]:
    """The ledger as {record[key]: record}; a step re-run after a resume keeps its last record, and
    a line cut by a crash is skipped. `key`: "global_step" (stale@k: one batch per step) or "update"
    (asynchronous trainers: one record per actor update, several per step)."""
    records: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # blank, or cut by a crash mid-write
            records[record[key]] = record
    return records
