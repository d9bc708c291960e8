"""`m2po report` on small hand-written logs with hand-computed tables, and on broken ones."""

from __future__ import annotations

import json
import os

import pytest

from m2po.cli import main as cli_main
from m2po.data import PAPER_BENCHMARKS
from m2po.report import main as report_main

# accuracy per benchmark, in PAPER_BENCHMARKS order
EARLY = [0.50, 0.10, 0.05, 0.40, 0.30, 0.20, 0.60, 0.25]  # mean 0.3
BEST = [0.80, 0.20, 0.10, 0.60, 0.40, 0.30, 0.70, 0.50]  # mean 0.45
LATE = [0.70, 0.20, 0.10, 0.50, 0.40, 0.30, 0.60, 0.40]  # mean 0.4


def val(values, variable="acc", n=4):
    return {f"val-core/{name}/{variable}/mean@{n}": v for name, v in zip(PAPER_BENCHMARKS, values)}


def train(clipfrac, m2_before=0.09, m2_after=0.04, staleness=256.0):
    return {"actor/pg_clipfrac": clipfrac, "actor/m2po/m2_before": m2_before, "actor/m2po/m2_after": m2_after,
            "stale/staleness_updates": staleness, "actor/pg_loss": 0.1}


def write_jsonl(path, records):
    with open(path, "w") as f:
        for step, data in records:
            f.write(json.dumps({"step": step, "data": data}) + "\n")


@pytest.fixture
def runs(tmp_path):
    # Run "m2po": a checkpoint folder with its metrics beside it (the paper scripts' layout) and a
    # stale ledger saying u = 4 (a batch generated at step 3 carries 8 updates).
    m2po_dir = tmp_path / "m2po"
    m2po_dir.mkdir()
    write_jsonl(tmp_path / "m2po.jsonl", [
        (0, val(EARLY)),
        (1, train(0.01)),
        (2, {**train(0.03), **val(BEST)}),
        (3, train(0.02)),
        (4, {**train(0.04), **val(LATE)}),
    ])
    (m2po_dir / "m2po_stale_ledger.jsonl").write_text(
        json.dumps({"global_step": 5, "generated_at": {"global_step": 3, "updates": 8}}) + "\n"
    )
    # Run "grpo": a metrics file given directly; a reward without `acc` logged at n = 1 and 4 (the
    # largest n counts), two benchmarks only, two equal averages (the earlier step wins), and a
    # last line cut by a crash.
    grpo = tmp_path / "grpo.jsonl"
    write_jsonl(grpo, [
        (1, {**train(0.10), "val-core/math500/reward/mean@1": 0.9, "val-core/math500/reward/mean@4": 0.6,
             "val-core/amc23/reward/mean@4": 0.2}),
        (2, {**train(0.30), "val-core/math500/reward/mean@4": 0.5, "val-core/amc23/reward/mean@4": 0.3}),
    ])
    with open(grpo, "a") as f:
        f.write('{"step": 3, "data": {"actor/pg_clip')
    return tmp_path


def test_table_and_per_run_summaries_match_hand_computed_values(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert report_main([str(runs / "m2po"), str(runs / "grpo.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = "| run | best step | " + " | ".join(PAPER_BENCHMARKS) + " | average | masked/clipped % |"
    assert header in printed
    # m2po: best = step 2 (average 45.0 vs 30.0 and 40.0); clipped fraction mean(1, 3, 2, 4)% = 2.50%
    assert "| m2po | 2 | 80.0 | 20.0 | 10.0 | 60.0 | 40.0 | 30.0 | 70.0 | 50.0 | 45.0 | 2.50 |" in printed
    # grpo: averages 0.4 at steps 1 and 2 -> step 1; math500 at mean@4 (0.6, not mean@1's 0.9);
    # clipped fraction mean(10, 30)% = 20.00%
    assert "| grpo | 1 | 60.0 | - | - | 20.0 | - | - | - | - | 40.0 | 20.00 |" in printed
    assert "best evaluation: step 2 (8 actor updates, u = 4 from the stale ledger), average 45.0%" in printed
    assert "the average is over 2 benchmark(s), not the paper's 8 (missing: aime24x4" in printed
    assert "grpo.jsonl: the last line (cut by a crash?) is not a metrics record; left out" in printed
    report = json.loads((out / "report.json").read_text())
    assert [r["best_step"] for r in report["runs"]] == [2, 1]
    assert report["runs"][0]["average"] == pytest.approx(0.45)
    assert report["runs"][1]["masked_or_clipped_fraction"] == pytest.approx(0.2)
    for name in ("validation_average.png", "masked_or_clipped_fraction.png", "m2.png", "staleness.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert (out / "report.md").read_text().count("| m2po | 2 |") == 1


def test_the_cli_runs_it(runs, tmp_path, capsys):
    assert cli_main(["report", str(runs / "m2po"), "--out", str(tmp_path / "r"), "--updates-per-step", "2"]) == 0
    assert "best evaluation: step 2 (4 actor updates, u = 2 from given)" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "no_metrics_file", "empty", "garbage", "no_validation"])
def test_missing_or_partial_logs_give_a_message_not_a_traceback(case, tmp_path, capsys):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty":
        (tmp_path / "run.jsonl").write_text("")
    elif case == "garbage":
        (tmp_path / "run.jsonl").write_text("not json\n")
    elif case == "no_validation":
        write_jsonl(tmp_path / "run.jsonl", [(1, train(0.05))])
    code = report_main([str(run), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    if case == "no_validation":  # a report, with the reason the accuracy columns are empty
        assert code == 0
        assert "no validation metrics (val-core/...): set trainer.test_freq > 0" in captured.out
        assert "| run | best step | average | masked/clipped % |" in captured.out
        assert "| run | - | - | 5.00 |" in captured.out
    else:
        assert code == 2
        expected = {
            "missing": "no such file or directory",
            "no_metrics_file": "no metrics file (looked for",
            "empty": "no metrics records in it",
            "garbage": "no metrics records in it",
        }[case]
        assert expected in captured.err and captured.err.startswith("m2po report: error:")
        assert not os.path.exists(tmp_path / "out")


def test_paper_scripts_log_metrics_where_the_report_looks(tmp_path):
    """The scripts run verl with its file logger rooted at `checkpoints`, so the metrics land at
    <project>/<experiment>.jsonl under it: beside the run's folder, `m2po report <folder>`'s first guess."""
    import subprocess

    from m2po.configs import compose
    from tests.test_train_scripts import SCRIPTS_DIR

    recorder = tmp_path / "python"
    recorder.write_text(f'#!/usr/bin/env bash\necho "$VERL_FILE_LOGGER_ROOT" > {tmp_path}/root\n')
    recorder.chmod(0o755)
    env = {**os.environ, "PYTHON": str(recorder)}
    env.pop("VERL_FILE_LOGGER_ROOT", None)
    subprocess.run(["bash", os.path.join(SCRIPTS_DIR, "qwen2.5-math-7b/m2po_s256.sh")], env=env, check=True, timeout=60)
    root = (tmp_path / "root").read_text().strip()
    config = compose("m2po_paper", ["llm=qwen2.5-math-7b", "method=m2po", "m2po.stale.staleness_updates=256"])
    assert "file" in config.trainer.logger
    metrics = os.path.join(root, config.trainer.project_name, f"{config.trainer.experiment_name}.jsonl")
    assert metrics == f"{config.trainer.default_local_dir}.jsonl"
    from m2po.report import metrics_candidates

    assert metrics_candidates(config.trainer.default_local_dir)[0] == metrics
