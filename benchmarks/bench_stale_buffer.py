"""The stale@k buffer at the paper's scale: memory, push/pop, the TransferQueue seam, checkpoints.

Batches have the field set verl 0.9.1's v1 trainer stores in TransferQueue for a GRPO/M2PO run
(jagged prompts, responses, response_mask, rollout_log_probs, old_log_probs, rm_scores; JSON
raw_prompt, reward_model, data_source, uid, session_id, extra_fields; keys and tags), at the
Qwen2.5-Math-7B s=256 settings: 2048 sequences x (1536 prompt + 2560 response) tokens, every
sequence at full length (the worst case), token ids from a 151,646-token vocabulary.

    python benchmarks/bench_stale_buffer.py                   # 64 queued batches (s=256, u=4), ~7.1 GiB of disk, ~3 min
    python benchmarks/bench_stale_buffer.py --batches 8 --sequences 256    # a quick look

Phases, as verl's `m2po_stale` trainer drives the buffer:
1. warm-up: d = 64 batches pushed (the default 1 GiB budget spills the rest to the store);
2. steady state: per step, the seam encodes the fresh batch (TransferQueue -> flat tensors),
   pushes it, pops the due one, decodes it (flat tensors -> per-sample dicts -> TensorDict), and a
   checkpoint is saved (the first one, then incremental ones);
3. resume: a fresh buffer loads the last checkpoint (verifying every entry) under the budget.
Reports bytes per batch, peak RSS, the buffer's resident bytes, times, disk bytes; prints a table
and writes JSON (benchmarks/results/stale_buffer.json). Reads come from the page cache where the
machine's RAM holds the files: load times are then a lower bound for a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import threading
import time

import torch
from tensordict import NonTensorStack, TensorDict
from tqdm import tqdm

from verl.utils.tensordict_utils import list_of_dict_to_tensordict

from m2po.buffer import PolicyVersion, StaleRolloutBuffer, StalenessConfig
from m2po.verl_integration.stale_settings import DEFAULT_RAM_BUDGET_GB
from m2po.verl_integration.transfer_queue_codec import decode_batch, encode_batch

VOCAB = 151_646  # Qwen2.5's
GIB = 2**30


class PeakRSS:
    """Peak resident set size of this process, sampled from /proc every 10 ms between resets."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.current())

    def reset(self) -> None:
        self.peak = self.current()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def transfer_queue_batch(index: int, sequences: int, prompt_len: int, response_len: int):
    """(TensorDict as `kv_batch_get` returns it, keys, tags) for one generated batch."""
    g = torch.Generator().manual_seed(index)

    def jagged(rows: torch.Tensor) -> torch.Tensor:
        return torch.nested.as_nested_tensor(list(rows.unbind()), layout=torch.jagged)

    responses = torch.randint(0, VOCAB, (sequences, response_len), generator=g)
    rewards = torch.zeros(sequences, response_len)
    rewards[:, -1] = (torch.rand(sequences, generator=g) > 0.5).float()
    prompt_text = "Solve the following math problem step by step. " * (prompt_len // 10)
    fields = {
        "prompts": jagged(torch.randint(0, VOCAB, (sequences, prompt_len), generator=g)),
        "responses": jagged(responses),
        "response_mask": jagged(torch.ones(sequences, response_len, dtype=torch.int64)),
        "rollout_log_probs": jagged(-torch.rand(sequences, response_len, generator=g) * 3),
        "old_log_probs": jagged(-torch.rand(sequences, response_len, generator=g) * 3),
        "rm_scores": jagged(rewards),
        "raw_prompt": NonTensorStack(*[[{"role": "user", "content": prompt_text}] for _ in range(sequences)]),
        "reward_model": NonTensorStack(*[{"style": "rule", "ground_truth": str(i)} for i in range(sequences)]),
        "data_source": NonTensorStack(*["DeepScaleR"] * sequences),
        "uid": NonTensorStack(*[f"{index:06d}-{i // 16:06d}" for i in range(sequences)]),
        "session_id": NonTensorStack(*[f"s{index}-{i}" for i in range(sequences)]),
        "extra_fields": NonTensorStack(*[{"num_turns": 2} for _ in range(sequences)]),
    }
    keys = [f"{index}_{i}" for i in range(sequences)]
    tags = [{"global_steps": index, "status": "finish"} for _ in range(sequences)]
    return TensorDict(fields, batch_size=[sequences]), keys, tags


def disk_bytes(directory: str) -> int:
    """Bytes on disk under `directory`, each hard-linked file once."""
    seen, total = set(), 0
    for root, _, files in os.walk(directory):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            if stat.st_ino not in seen:
                seen.add(stat.st_ino)
                total += stat.st_size
    return total


def timed(fn, *args):
    """(fn(*args), seconds)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=64, help="queued batches d = k/u (paper s=256, u=4: 64)")
    parser.add_argument("--sequences", type=int, default=2048, help="sequences per batch (paper: 2048)")
    parser.add_argument("--prompt-len", type=int, default=1536)
    parser.add_argument("--response-len", type=int, default=2560)
    parser.add_argument("--steps", type=int, default=4, help="steady-state steps, a checkpoint after each")
    parser.add_argument("--budget-gb", type=float, default=DEFAULT_RAM_BUDGET_GB,
                        help="m2po.stale.ram_budget_gb (default: the shipped default)")
    parser.add_argument("--work-dir", default=None, help="where the run folder goes (default: a temp folder)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/stale_buffer.json)")
    args = parser.parse_args()
    for name in ("batches", "sequences", "prompt_len", "response_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.budget_gb > 0:
        parser.error("--budget-gb must be > 0")

    work_dir = args.work_dir or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"m2po-bench-buffer-{os.getpid()}")
    shutil.rmtree(work_dir, ignore_errors=True)
    store, checkpoints = os.path.join(work_dir, "m2po_stale_store"), os.path.join(work_dir, "checkpoints")
    budget = int(args.budget_gb * GIB)
    config = StalenessConfig(staleness_updates=4 * args.batches, updates_per_iteration=4)
    rss = PeakRSS()
    report = {"settings": vars(args) | {"budget_bytes": budget}, "machine": platform.machine(), "cpus": os.cpu_count()}

    try:
        buffer = StaleRolloutBuffer(config, ram_budget_bytes=budget, spill_dir=store)
        baseline_rss = PeakRSS.current()
        # ---------------------------------------------------------------- 1. warm-up
        rss.reset()
        push_s, encode_s, resident_max, batch_nbytes = [], [], 0, None
        for i in tqdm(range(args.batches), desc="warm-up pushes"):
            data, keys, tags = transfer_queue_batch(i, args.sequences, args.prompt_len, args.response_len)
            flat, seconds = timed(encode_batch, data, keys, tags)
            encode_s.append(seconds)
            del data
            _, seconds = timed(buffer.push, flat, PolicyVersion(0, 0))
            push_s.append(seconds)
            raw_bytes = sum(t.numel() * t.element_size() for t in flat.values())
            del flat
            batch_nbytes = buffer._queue[-1].nbytes
            resident_max = max(resident_max, buffer.resident_bytes())
        report["batch"] = {"raw_bytes": raw_bytes, "compact_bytes": batch_nbytes}
        report["warmup"] = {"push_s_median": statistics.median(push_s), "encode_s_median": statistics.median(encode_s),
                            "peak_rss_bytes": rss.peak - baseline_rss, "resident_max_bytes": resident_max}

        # ---------------------------------------------------------------- 2. steady state
        steps = []
        for step in tqdm(range(1, args.steps + 1), desc="steady-state steps"):
            rss.reset()
            version = PolicyVersion(step, 4 * (step - 1))  # as the trainer counts: warm-up batches are step 0's
            data, keys, tags = transfer_queue_batch(args.batches + step, args.sequences, args.prompt_len,
                                                    args.response_len)
            flat, encode = timed(encode_batch, data, keys, tags)
            del data
            _, push = timed(buffer.push, flat, version)
            del flat
            resident_after_push = buffer.resident_bytes()
            ready, pop = timed(buffer.pop_ready, version)
            assert ready is not None
            (keys_out, tags_out, samples), decode = timed(decode_batch, ready.batch)
            _, to_tensordict = timed(list_of_dict_to_tensordict, samples)
            del ready, samples
            save_report, save = timed(buffer.save, os.path.join(checkpoints, f"global_step_{step}", "buffer"))
            steps.append({
                "step": step, "encode_s": encode, "push_s": push, "pop_s": pop, "decode_s": decode,
                "to_tensordict_s": to_tensordict, "save_s": save, "save_written_bytes": save_report.written_bytes,
                "save_linked_entries": save_report.linked_entries,
                "resident_bytes": max(resident_after_push, buffer.resident_bytes()),
                "peak_rss_bytes": rss.peak - baseline_rss,
            })
            if step >= 3:  # verl's max_actor_ckpt_to_keep=2-style pruning: the older ones go
                shutil.rmtree(os.path.join(checkpoints, f"global_step_{step - 2}"))
        report["batch"]["file_bytes"] = os.path.getsize(buffer._queue[-1].store_path)  # all stored after a save
        buffer.close()
        report["steps"] = steps
        report["disk"] = {"store_bytes": disk_bytes(store), "checkpoints_bytes": disk_bytes(checkpoints),
                          "total_bytes": disk_bytes(work_dir)}

        # ---------------------------------------------------------------- 3. resume
        last = os.path.join(checkpoints, f"global_step_{args.steps}", "buffer")
        del buffer
        rss.reset()
        before_load = PeakRSS.current()
        resumed = StaleRolloutBuffer(config, ram_budget_bytes=budget, spill_dir=store)
        _, load = timed(resumed.load, last)
        resumed.close()
        report["resume"] = {"load_s": load, "peak_rss_over_start_bytes": rss.peak - before_load,
                            "resident_bytes": resumed.resident_bytes(), "entries": len(resumed)}
    finally:
        rss.stop()
        shutil.rmtree(work_dir, ignore_errors=True)

    print_table(report)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stale_buffer.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out}")


def print_table(report: dict) -> None:
    mb = 2**20
    batch, steps = report["batch"], report["steps"]
    incremental = steps[1:] or steps
    queue_bytes = report["settings"]["batches"] * batch["file_bytes"]
    rows = [
        ("batch: TransferQueue fields / compact / file", f"{batch['raw_bytes'] / mb:.0f} / {batch['compact_bytes'] / mb:.0f} / {batch['file_bytes'] / mb:.0f} MiB"),
        ("queue on disk (d batches)", f"{queue_bytes / mb:.0f} MiB"),
        ("RAM budget", f"{report['settings']['budget_bytes'] / mb:.0f} MiB"),
        ("buffer-resident bytes, max (warm-up / steps)",
         f"{report['warmup']['resident_max_bytes'] / mb:.0f} / {max(s['resident_bytes'] for s in steps) / mb:.0f} MiB"),
        ("peak RSS over start (warm-up / steps)",
         f"{report['warmup']['peak_rss_bytes'] / mb:.0f} / {max(s['peak_rss_bytes'] for s in steps) / mb:.0f} MiB"),
        ("push, median (warm-up: spills to the store)", f"{report['warmup']['push_s_median']:.2f} s"),
        ("push / pop, median (steady state)",
         f"{statistics.median(s['push_s'] for s in steps):.2f} / {statistics.median(s['pop_s'] for s in steps):.3f} s"),
        ("seam: encode / decode / to TensorDict, median",
         f"{statistics.median(s['encode_s'] for s in steps):.2f} / {statistics.median(s['decode_s'] for s in steps):.2f}"
         f" / {statistics.median(s['to_tensordict_s'] for s in steps):.2f} s"),
        ("seam per GiB of TransferQueue fields (encode + decode + TensorDict)",
         f"{statistics.median(s['encode_s'] + s['decode_s'] + s['to_tensordict_s'] for s in steps) / (batch['raw_bytes'] / 2**30):.2f} s/GiB"),
        ("checkpoint: first save (written)", f"{steps[0]['save_s']:.2f} s ({steps[0]['save_written_bytes'] / mb:.0f} MiB)"),
        ("checkpoint: incremental save, median (written)",
         f"{statistics.median(s['save_s'] for s in incremental):.3f} s "
         f"({statistics.median(s['save_written_bytes'] for s in incremental) / mb:.0f} MiB)"),
        ("resume: load + verify d batches", f"{report['resume']['load_s']:.1f} s"),
        ("resume: peak RSS over start / resident after", f"{report['resume']['peak_rss_over_start_bytes'] / mb:.0f} / {report['resume']['resident_bytes'] / mb:.0f} MiB"),
        ("disk: store / checkpoints / total (unique bytes)",
         f"{report['disk']['store_bytes'] / mb:.0f} / {report['disk']['checkpoints_bytes'] / mb:.0f} / {report['disk']['total_bytes'] / mb:.0f} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    s = report["settings"]
    print(f"\nstale buffer: {s['batches']} batches x {s['sequences']} x ({s['prompt_len']} + {s['response_len']}) tokens, "
          f"{s['steps']} steps; {report['cpus']} CPUs")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")


if __name__ == "__main__":
    main()
