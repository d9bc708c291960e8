"""Reading what verl's `file` logger wrote, across the attempts of a run (no verl import).

verl's file logger opens its JSON-lines file with mode "wb" (`verl/utils/tracking.py`), so a run that
is resumed into the same file would erase the metrics logged before the crash. Two layouts keep them:
- `python -m m2po.testbed --engine verl` logs each attempt to its own file,
  `<run>/metrics/attempt-<n>.jsonl` (`VERL_FILE_LOGGER_PATH`);
- any other run with the plugin installed (the paper scripts, a user's own `main_ppo`): when a run
  resumes, the plugin moves the previous attempts' file `<name>.jsonl` aside to
  `<name>.attempt-<n>.jsonl` before verl truncates it (`m2po.verl_integration.metrics_attempts`);
  a run that starts afresh moves the old files to `<name>.superseded-<time>...` instead, so that they
  are neither lost nor merged into the new run.
Readers merge the attempts: a step logged by several attempts (the steps after the last checkpoint are
trained again after a resume) takes the later attempt's values.
"""

from __future__ import annotations

import json
import os
import re

ATTEMPTS_DIR = "metrics"
_ATTEMPT = re.compile(r"^attempt-(\d+)\.jsonl$")


def _numbered(folder: str, pattern: re.Pattern) -> list[tuple[int, str]]:
    """(number, path) of the files in `folder` whose name `pattern` matches (group 1: the number), by number."""
    if not os.path.isdir(folder):
        return []
    return sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := pattern.match(name)))


def attempt_files(run_dir: str) -> list[str]:
    """The attempts' metrics files of a run, oldest first ([] when there are none)."""
    return [path for _, path in _numbered(os.path.join(run_dir, ATTEMPTS_DIR), _ATTEMPT)]


def next_attempt_file(run_dir: str) -> str:
    """Where the next attempt of a run logs: one past the highest attempt number so far."""
    number = 1 + max((n for n, _ in _numbered(os.path.join(run_dir, ATTEMPTS_DIR), _ATTEMPT)), default=0)
    os.makedirs(os.path.join(run_dir, ATTEMPTS_DIR), exist_ok=True)
    return os.path.join(run_dir, ATTEMPTS_DIR, f"attempt-{number:03d}.jsonl")


def _archives(metrics_file: str) -> list[tuple[int, str]]:
    folder, base = os.path.split(os.path.abspath(metrics_file))
    return _numbered(folder, re.compile(rf"^{re.escape(base.removesuffix('.jsonl'))}\.attempt-(\d+)\.jsonl$"))


def archived_attempts(metrics_file: str) -> list[str]:
    """The earlier attempts kept beside `<name>.jsonl` as `<name>.attempt-<n>.jsonl`, oldest first."""
    return [path for _, path in _archives(metrics_file)]


def next_archive_path(metrics_file: str) -> str:
    """Where the attempt now in `metrics_file` is kept when the run resumes."""
    number = 1 + max((n for n, _ in _archives(metrics_file)), default=0)
    return f"{os.path.abspath(metrics_file).removesuffix('.jsonl')}.attempt-{number:03d}.jsonl"


def superseded_path(path: str, metrics_file: str, stamp: str) -> str:
    """`path` (the metrics file or one of its archives) renamed out of the run's attempts."""
    stem = os.path.abspath(metrics_file).removesuffix(".jsonl")
    return f"{stem}.superseded-{stamp}{os.path.abspath(path)[len(stem):]}"


def read_metrics(path: str) -> tuple[dict[int, dict[str, float]], list[str]]:
    """step -> numeric metrics (records of one step merged in order), and notes on lines left out."""
    steps: dict[int, dict[str, float]] = {}
    notes = []
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), record["data"]
        except (ValueError, KeyError, TypeError):
            where = "the last line (cut by a crash?)" if number == len(lines) else f"line {number}"
            notes.append(f"{os.path.basename(path)}: {where} is not a metrics record; left out")
            continue
        merged = steps.setdefault(step, {})
        merged.update({k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return steps, notes


def merge_attempts(paths: list[str]) -> tuple[dict[int, dict[str, float]], list[str]]:
    """The metrics of a run logged over several attempts (`paths` oldest first): where more than one
    attempt logged a metric of a step, the later attempt's value is kept (a resumed run validates again
    at its checkpoint's step and retrains the steps after it). Notes say which steps were logged again
    and which training steps are missing (a lost or cut attempt file): every step from 1, or from the
    first one logged when there is no step 0 (validation before training), to the last."""
    steps: dict[int, dict[str, float]] = {}
    notes: list[str] = []
    for path in paths:
        attempt, attempt_notes = read_metrics(path)
        notes += attempt_notes
        again = sorted(set(attempt) & set(steps))
        if again:
            notes.append(
                f"{os.path.basename(path)} logged step(s) {_ranges(again)} again after a resume; its values are kept"
            )
        for step, metrics in attempt.items():
            steps.setdefault(step, {}).update(metrics)
    training = sorted(step for step in steps if step > 0)
    if training:
        first = 1 if 0 in steps else training[0]
        missing = sorted(set(range(first, training[-1] + 1)) - set(training))
        if missing:
            notes.append(f"no metrics for step(s) {_ranges(missing)}: an attempt's metrics file is missing or cut")
    return steps, notes


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
