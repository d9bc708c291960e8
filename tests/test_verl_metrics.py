"""A run's metrics over several attempts (verl's file logger truncates its file on resume, so each
attempt logs to its own file): merged with the later attempt winning, gaps reported, and `m2po report`
on a run folder holding attempts."""

from __future__ import annotations

import json
import os

from m2po.report import load_run, main as report_main, summarize
from m2po.utils.verl_metrics import attempt_files, merge_attempts, next_attempt_file


def write_attempt(run_dir, records):
    path = next_attempt_file(str(run_dir))
    with open(path, "w") as f:
        for step, data in records:
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    return path


def test_attempts_are_numbered_in_order_past_ten(tmp_path):
    paths = [write_attempt(tmp_path, [(1, {"x": i})]) for i in range(11)]
    assert [os.path.basename(p) for p in paths[:2]] == ["attempt-001.jsonl", "attempt-002.jsonl"]
    assert attempt_files(str(tmp_path)) == paths  # numeric order: 010 after 009, 011 last
    (tmp_path / "metrics" / "notes.txt").write_text("not an attempt")
    assert attempt_files(str(tmp_path)) == paths


def test_the_later_attempt_wins_per_metric_and_nothing_before_the_crash_is_lost(tmp_path):
    # attempt 1: validates at 0, trains 1-5, checkpoint at 4, SIGKILL during step 6 (line cut)
    first = write_attempt(tmp_path, [(0, {"val": 0.1}), *[(s, {"loss": float(s), "clip": 0.5}) for s in range(1, 6)]])
    with open(first, "a") as f:
        f.write('{"step": 6, "da')
    # attempt 2: resumes from step 4, validates there again, retrains 5 and goes on to 7
    write_attempt(tmp_path, [(4, {"val": 0.4}), (5, {"loss": 50.0}), (6, {"loss": 60.0}), (7, {"loss": 70.0})])
    steps, notes = merge_attempts(attempt_files(str(tmp_path)))
    assert sorted(steps) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert steps[0] == {"val": 0.1}
    assert steps[4] == {"loss": 4.0, "clip": 0.5, "val": 0.4}  # training from attempt 1, validation from 2
    assert steps[5] == {"loss": 50.0, "clip": 0.5}  # retrained: the later attempt's value
    assert steps[7] == {"loss": 70.0}
    assert any("attempt-001.jsonl: the last line" in n for n in notes)
    assert any("attempt-002.jsonl logged step(s) 4-5 again" in n for n in notes)
    assert not any("no metrics for step" in n for n in notes)


def test_missing_steps_are_reported(tmp_path):
    write_attempt(tmp_path, [(0, {"val": 0.1}), (3, {"loss": 3.0}), (4, {"loss": 4.0}), (7, {"loss": 7.0})])
    _, notes = merge_attempts(attempt_files(str(tmp_path)))
    assert "no metrics for step(s) 1-2, 5-6: an attempt's metrics file is missing or cut" in notes
    # without step 0 the first logged step is where the run may have started
    other = tmp_path / "other"
    write_attempt(other, [(3, {"loss": 3.0}), (5, {"loss": 5.0})])
    assert merge_attempts(attempt_files(str(other)))[1] == ["no metrics for step(s) 4: an attempt's metrics file is missing or cut"]


def test_report_on_a_run_folder_with_attempts_picks_the_best_step_across_them(tmp_path, capsys):
    run = tmp_path / "m2po-seed0"
    key = "val-core/copy_add/acc/mean@1"
    write_attempt(run, [(0, {key: 0.10}), (1, {"actor/pg_clipfrac": 0.02}), (2, {"actor/pg_clipfrac": 0.04, key: 0.50}),
                        (3, {"actor/pg_clipfrac": 0.06})])
    write_attempt(run, [(2, {key: 0.30}), (3, {"actor/pg_clipfrac": 0.08}), (4, {"actor/pg_clipfrac": 0.10, key: 0.40})])
    log = load_run(str(run))
    assert log.name == "m2po-seed0" and log.metrics_path == str(run / "metrics")
    summary = summarize(log)
    # step 2's validation was repeated after the resume (0.30 replaces 0.50): the best is step 4
    assert (summary.best_step, summary.average) == (4, 0.40)
    assert abs(summary.masked_or_clipped_fraction - (0.02 + 0.04 + 0.08 + 0.10) / 4) < 1e-12
    assert summary.notes[0] == "2 attempts (a crash or a stop, then a resume) merged"
    assert report_main([str(run), "--out", str(tmp_path / "report")]) == 0
    assert "| m2po-seed0 | 4 | 40.0 | 40.0 | 6.00 |" in capsys.readouterr().out
