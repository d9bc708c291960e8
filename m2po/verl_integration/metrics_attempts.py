"""No metric lost across a resume: verl's file logger truncates its file when a run starts, so the
previous attempts' file is moved aside first (`m2po.utils.verl_metrics` names the files and merges them).

Installed by the plugin in every process that imports verl; it acts when verl's `Tracking` is created
with the `file` backend (the trainer's process, at start-up, before anything is logged):
- the run resumes (`trainer.resume_mode` is `resume_path`, or `auto` with a checkpoint in
  `trainer.default_local_dir`): a non-empty `<name>.jsonl` becomes `<name>.attempt-<n>.jsonl`, which
  `m2po report` merges with the new attempt's file (the later attempt wins a step logged twice);
- the run starts afresh: the old file and its archived attempts become `<name>.superseded-<time>...`,
  kept but not merged into the new run.
verl's own behaviour is unchanged otherwise: the file and its records are verl's.
"""

from __future__ import annotations

import os
import time

import wrapt

from m2po.utils.verl_metrics import archived_attempts, next_archive_path, superseded_path

LATEST_CHECKPOINT_FILE = "latest_checkpointed_iteration.txt"  # verl's marker of a complete checkpoint


def file_logger_path(project_name: str, experiment_name: str) -> str:
    """Where verl 0.9.1's FileLogger writes (verl/utils/tracking.py, FileLogger.__init__)."""
    path = os.getenv("VERL_FILE_LOGGER_PATH")
    if path:
        return path
    root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
    return os.path.join(root, project_name, f"{experiment_name}.jsonl")


def resumes(config: dict) -> bool:
    """Whether verl's trainer will resume from a checkpoint (trainer.resume_mode, verl's rules)."""
    trainer = (config or {}).get("trainer") or {}
    mode = trainer.get("resume_mode", "auto")
    if mode == "resume_path":
        return True
    if mode != "auto":
        return False
    folder = trainer.get("default_local_dir") or "checkpoints"
    return os.path.isfile(os.path.join(os.path.expanduser(str(folder)), LATEST_CHECKPOINT_FILE))


def keep_previous_attempts(metrics_file: str, resuming: bool) -> list[tuple[str, str]]:
    """Move the previous attempts' metrics out of verl's way; returns the (from, to) renames."""
    moves = []
    if resuming:
        if os.path.isfile(metrics_file) and os.path.getsize(metrics_file) > 0:
            moves.append((metrics_file, next_archive_path(metrics_file)))
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        old = [*archived_attempts(metrics_file)]
        if os.path.isfile(metrics_file) and os.path.getsize(metrics_file) > 0:
            old.append(metrics_file)
        moves += [(path, superseded_path(path, metrics_file, stamp)) for path in old]
    for source, target in moves:
        os.replace(source, target)
    return moves


def _before_tracking(wrapped, instance, args, kwargs):
    names = ("project_name", "experiment_name", "default_backend", "config")
    bound = dict(zip(names, args), **kwargs)
    backends = bound.get("default_backend", "console")
    backends = [backends] if isinstance(backends, str) else list(backends or [])
    if "file" in backends and bound.get("project_name") is not None and bound.get("experiment_name") is not None:
        metrics_file = file_logger_path(str(bound["project_name"]), str(bound["experiment_name"]))
        for source, target in keep_previous_attempts(metrics_file, resumes(bound.get("config") or {})):
            print(f"[m2po] metrics of the previous attempt kept: {source} -> {target}", flush=True)
    return wrapped(*args, **kwargs)


def install_metrics_attempts_hook() -> None:
    """Wrap `verl.utils.tracking.Tracking.__init__` once that module is imported (idempotent)."""

    @wrapt.when_imported("verl.utils.tracking")
    def _wrap(module):
        if not getattr(module.Tracking.__init__, "_m2po_attempts", False):
            wrapt.wrap_function_wrapper(module, "Tracking.__init__", _before_tracking)
            module.Tracking.__init__._m2po_attempts = True
