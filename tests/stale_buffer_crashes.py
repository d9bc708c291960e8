"""Kill -9 the stale buffer at every file operation of a save, a prune or a resume, and check what
is left on disk. Run by tests/test_stale_buffer_store.py as

    python -m tests.stale_buffer_crashes SCENARIO WORK_DIR        # prints one JSON line

For each crash point n = 1, 2, ... a forked child replays the scenario on a fresh copy of a run
directory and SIGKILLs itself just before its n-th file operation (link, replace, rename, remove,
unlink, rmdir, fsync, mkdir); this process then opens what is left with a fresh buffer, as a
resumed run would, and records the outcome. A separate interpreter, because forking the test
runner (threads, torch's pools) is not safe.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import torch

from m2po.buffer import CorruptCheckpointError, PolicyVersion, StaleRolloutBuffer, StalenessConfig, storage
from m2po.utils.atomic_io import remove_directory, remove_leftovers

FILE_OPERATIONS = ("link", "replace", "rename", "remove", "unlink", "rmdir", "fsync", "mkdir")
CONFIG = StalenessConfig(4, 1)


def make_batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "input_ids": torch.randint(0, 150_000, (4, 6), generator=g),
        "response_mask": torch.rand(4, 6, generator=g) > 0.3,
        "old_log_probs": -torch.rand(4, 6, generator=g),
        "advantages": torch.randn(4, 6, generator=g),
        "index": torch.full((4,), i, dtype=torch.int64),
    }


def new_buffer(run_dir: str) -> StaleRolloutBuffer:
    # A budget of 2 batches: some queued batches are in RAM only, some in the store.
    entry_bytes = storage.nbytes(storage.compact(make_batch(0))[0])
    return StaleRolloutBuffer(CONFIG, ram_budget_bytes=2 * entry_bytes, spill_dir=os.path.join(run_dir, "store"))


def iterate(buffer: StaleRolloutBuffer, start: int, stop: int) -> list[str]:
    """Iterations start..stop-1 (one update each, paper warm-up); the hashes of what was trained."""
    trained = []
    for t in range(start, stop):
        version = PolicyVersion(global_step=t, updates=t)
        for w in range(buffer.warmup_batches_needed()):
            buffer.push(make_batch(-1 - w), version)
        buffer.push(make_batch(t), version)
        item = buffer.pop_ready(version)
        trained.append(item.content_hash)
    return trained


def checkpoint(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"global_step_{step}", "stale_buffer")


def open_checkpoint(run_dir: str, step: int) -> tuple[str, list[str] | None]:
    """('loads', hashes) | ('refused: <reason>', None) | ('absent', None), as a resumed run sees it."""
    path = checkpoint(run_dir, step)
    remove_leftovers(path)
    if not os.path.exists(path):
        return "absent", None
    buffer = new_buffer(run_dir)
    try:
        buffer.load(path)
    except CorruptCheckpointError as error:
        return f"refused: {error}", None
    finally:
        buffer.close()
    return "loads", buffer.content_hashes()


def count_and_kill(kill_at: int, action) -> int:
    """Run `action` counting file operations; SIGKILL just before operation `kill_at` (0: never)."""
    count = 0
    originals = {name: getattr(os, name) for name in FILE_OPERATIONS}

    def counted(name):
        def operation(*args, **kwargs):
            nonlocal count
            count += 1
            if count == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return originals[name](*args, **kwargs)

        return operation

    for name in FILE_OPERATIONS:
        setattr(os, name, counted(name))
    try:
        action()
    finally:
        for name, original in originals.items():
            setattr(os, name, original)
    return count


def in_child(kill_at: int, run_dir: str, scenario: str, count_file: str) -> bool:
    """Replay `scenario` in a forked child killed at `kill_at`; True if it was killed."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(60)  # a hang fails the test instead of blocking it
            setup, armed = SCENARIOS[scenario](run_dir)
            setup()
            count = count_and_kill(kill_at, armed)
            with open(count_file, "w") as f:
                f.write(str(count))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return True
    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
        raise RuntimeError(f"scenario {scenario} failed in the child (status {status})")
    return False


# ------------------------------------------------------------------ scenarios
# Each returns (setup, armed) for the child; the template run directory holds what earlier
# iterations left (see `template`).


def _save_and_prune(run_dir):
    state = {}

    def setup():
        state["buffer"] = buffer = new_buffer(run_dir)
        buffer.load(checkpoint(run_dir, 5))

    def armed():
        buffer = state["buffer"]
        iterate(buffer, 5, 7)  # spills, pops (their store files go), prefetches
        buffer.save(checkpoint(run_dir, 7))
        remove_directory(checkpoint(run_dir, 5))  # the older checkpoint is pruned
        buffer.close()

    return setup, armed


def _resume(run_dir):
    state = {}

    def setup():
        state["buffer"] = new_buffer(run_dir)

    def armed():
        state["buffer"].load(checkpoint(run_dir, 7))
        state["buffer"].close()

    return setup, armed


SCENARIOS = {"save_and_prune": _save_and_prune, "resume": _resume}


def template(work_dir: str, scenario: str) -> tuple[str, dict]:
    """The run directory a scenario starts from, and the reference hashes of an uninterrupted run."""
    run_dir = os.path.join(work_dir, "template")
    buffer = new_buffer(run_dir)
    trained = iterate(buffer, 0, 5)
    buffer.save(checkpoint(run_dir, 5))
    at_5 = buffer.content_hashes()
    trained += iterate(buffer, 5, 7)
    at_7 = buffer.content_hashes()
    if scenario == "resume":
        buffer.save(checkpoint(run_dir, 7))
    trained += iterate(buffer, 7, 12)
    buffer.close()
    if scenario != "resume":  # the scenario's child saves step 7 itself
        shutil.rmtree(os.path.dirname(checkpoint(run_dir, 7)), ignore_errors=True)
    return run_dir, {"at_5": at_5, "at_7": at_7, "trained": trained}


def main(scenario: str, work_dir: str) -> dict:
    torch.set_num_threads(1)
    template_dir, reference = template(work_dir, scenario)
    count_file = os.path.join(work_dir, "count")
    outcomes = []
    kill_at = 0
    while True:
        kill_at += 1
        run_dir = os.path.join(work_dir, f"crash-{kill_at}")
        subprocess.run(["cp", "-a", template_dir, run_dir], check=True)  # keeps the hard links
        killed = in_child(kill_at, run_dir, scenario, count_file)
        outcome = {"kill_at": kill_at, "killed": killed}
        for step in (5, 7):
            status, hashes = open_checkpoint(run_dir, step)
            outcome[f"step_{step}"] = status
            outcome[f"step_{step}_exact"] = hashes == reference[f"at_{step}"] if hashes is not None else None
        if scenario == "resume" and outcome["step_7"] == "loads":
            # The resumed run continues exactly as the uninterrupted one.
            buffer = new_buffer(run_dir)
            buffer.load(checkpoint(run_dir, 7))
            outcome["continues_exactly"] = iterate(buffer, 7, 12) == reference["trained"][7:]
            buffer.close()
        outcomes.append(outcome)
        shutil.rmtree(run_dir)
        if not killed:
            break
    with open(count_file) as f:
        operations = int(f.read())
    return {"operations": operations, "outcomes": outcomes}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
