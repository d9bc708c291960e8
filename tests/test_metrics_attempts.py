"""No metric lost across a resume: the plugin moves the previous attempts' metrics file aside before
verl's file logger truncates it, and `m2po report` merges the attempts (through verl's own `Tracking`;
the SIGKILL and resume through `main_ppo` is in tests/test_cpu_e2e.py)."""

from __future__ import annotations

import os

import pytest

import verl  # noqa: F401  (loads the plugin, which installs the hook)
from verl.utils.tracking import Tracking

from m2po.report import load_run
from m2po.utils.verl_metrics import archived_attempts, next_archive_path
from m2po.verl_integration.metrics_attempts import LATEST_CHECKPOINT_FILE, file_logger_path, resumes


def attempt(root, checkpoints, steps, resume_mode="auto", project="proj", experiment="exp"):
    """One attempt of a run: verl's Tracking with the file logger, as verl's trainer creates it."""
    config = {"trainer": {"default_local_dir": str(checkpoints), "resume_mode": resume_mode}}
    tracking = Tracking(project_name=project, experiment_name=experiment, default_backend=["file"], config=config)
    for step, accuracy in steps:
        tracking.log({"val-core/math500/acc/mean@4": accuracy, "actor/m2po/masked_fraction": 0.001}, step=step)
    tracking.logger["file"].finish()


@pytest.fixture
def logger_root(tmp_path, monkeypatch):
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    return tmp_path


def test_a_resumed_run_keeps_the_crashed_attempts_metrics_and_the_report_merges_them(logger_root, capsys):
    checkpoints = logger_root / "proj" / "exp"
    checkpoints.mkdir(parents=True)
    attempt(logger_root, checkpoints, [(0, 0.10), (1, 0.11), (2, 0.20), (3, 0.99)])  # crashed during step 3
    (checkpoints / LATEST_CHECKPOINT_FILE).write_text("2")
    attempt(logger_root, checkpoints, [(2, 0.21), (3, 0.30), (4, 0.40)])  # resumed from step 2
    assert "metrics of the previous attempt kept" in capsys.readouterr().out
    metrics_file = str(logger_root / "proj" / "exp.jsonl")
    assert archived_attempts(metrics_file) == [metrics_file.replace(".jsonl", ".attempt-001.jsonl")]
    run = load_run(str(checkpoints))
    accuracy = {step: m["val-core/math500/acc/mean@4"] for step, m in run.steps.items()}
    assert accuracy == {0: 0.10, 1: 0.11, 2: 0.21, 3: 0.30, 4: 0.40}  # the later attempt wins a repeated step
    assert run.notes == ["2 attempts (a crash or a stop, then a resume) merged",
                         "exp.jsonl logged step(s) 2-3 again after a resume; its values are kept"]
    # a third attempt: the archive numbering goes on
    attempt(logger_root, checkpoints, [(4, 0.41), (5, 0.50)])
    assert [os.path.basename(p) for p in archived_attempts(metrics_file)] == ["exp.attempt-001.jsonl", "exp.attempt-002.jsonl"]
    assert sorted(load_run(str(checkpoints)).steps) == [0, 1, 2, 3, 4, 5]


def test_a_fresh_start_keeps_the_old_files_out_of_the_new_run(logger_root):
    checkpoints = logger_root / "proj" / "exp"
    checkpoints.mkdir(parents=True)
    attempt(logger_root, checkpoints, [(0, 0.1), (1, 0.2), (2, 0.3)])
    (checkpoints / LATEST_CHECKPOINT_FILE).write_text("2")
    attempt(logger_root, checkpoints, [(3, 0.4)])
    attempt(logger_root, checkpoints, [(0, 0.5)], resume_mode="disable")  # the user starts again
    assert sorted(load_run(str(checkpoints)).steps) == [0]
    kept = sorted(name for name in os.listdir(logger_root / "proj") if ".superseded-" in name)
    assert len(kept) == 2 and kept[0].endswith(".attempt-001.jsonl") and kept[1].endswith("Z.jsonl")


def test_a_gap_between_attempts_is_reported(logger_root):
    checkpoints = logger_root / "proj" / "exp"
    checkpoints.mkdir(parents=True)
    attempt(logger_root, checkpoints, [(0, 0.1), (1, 0.2)])
    (checkpoints / LATEST_CHECKPOINT_FILE).write_text("4")
    attempt(logger_root, checkpoints, [(4, 0.4), (5, 0.5)])
    assert "no metrics for step(s) 2-3: an attempt's metrics file is missing or cut" in load_run(str(checkpoints)).notes


def test_an_empty_metrics_file_is_not_kept_as_an_attempt(logger_root):
    checkpoints = logger_root / "proj" / "exp"
    checkpoints.mkdir(parents=True)
    (logger_root / "proj" / "exp.jsonl").write_bytes(b"")
    (checkpoints / LATEST_CHECKPOINT_FILE).write_text("2")
    attempt(logger_root, checkpoints, [(0, 0.1)])
    assert archived_attempts(str(logger_root / "proj" / "exp.jsonl")) == []
    assert load_run(str(checkpoints)).notes == []


def test_where_verl_writes_and_when_it_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "m.jsonl"))
    assert file_logger_path("p", "e") == str(tmp_path / "m.jsonl")
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    assert file_logger_path("p", "e") == os.path.join(str(tmp_path), "p", "e.jsonl")
    assert next_archive_path(str(tmp_path / "p" / "e.jsonl")) == str(tmp_path / "p" / "e.attempt-001.jsonl")
    assert resumes({"trainer": {"resume_mode": "resume_path", "default_local_dir": str(tmp_path / "none")}})
    assert not resumes({"trainer": {"resume_mode": "auto", "default_local_dir": str(tmp_path / "none")}})
    (tmp_path / LATEST_CHECKPOINT_FILE).write_text("1")
    assert resumes({"trainer": {"resume_mode": "auto", "default_local_dir": str(tmp_path)}})
    assert not resumes({"trainer": {"resume_mode": "disable", "default_local_dir": str(tmp_path)}})
