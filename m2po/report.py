"""`m2po report RUN [RUN ...]` (also `python -m m2po.report`): the paper's Table 1 and curves from
what verl logged.

A RUN is a run's checkpoint folder (`trainer.default_local_dir`) or its metrics file. The metrics
are verl's `file` logger JSON lines (the paper scripts log to `<checkpoint folder>.jsonl`, see
train-scripts/launch.sh, with a resumed run's earlier attempts beside it as `<folder>.attempt-<n>.jsonl`;
runs of `python -m m2po.testbed --engine verl` log each attempt to `<folder>/metrics/attempt-<n>.jsonl`;
attempts are merged, the later one winning a step logged twice, and a missing step is reported); the
stale ledger (`m2po_stale_ledger.jsonl` in the checkpoint folder), when
there, gives the actor updates per step. Per run it prints the best evaluation step by the
average over the paper's eight benchmarks (the paper's protocol), each benchmark's accuracy there
(verl's `val-core/<benchmark>/<acc|reward>/mean@n`: avg@16 for the AIME x4 sets, avg@4 elsewhere),
the average and the mean masked/clipped fraction; then one Table-1-style table for all runs, and
writes report.md, report.json and four plots (PNG) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field

from m2po.data import PAPER_BENCHMARKS
from m2po.utils.verl_metrics import ATTEMPTS_DIR, archived_attempts, attempt_files, merge_attempts

LEDGER_FILE = "m2po_stale_ledger.jsonl"  # m2po.verl_integration.ledger.LEDGER_FILE (no verl import here)
CLIP_FRACTION = "actor/pg_clipfrac"  # the masked (M2PO) or clipped (PPO/GRPO) fraction of tokens
M2_BEFORE, M2_AFTER = "actor/m2po/m2_before", "actor/m2po/m2_after"
STALENESS_KEYS = ("stale/staleness_updates", "stale/staleness_updates_mean")  # stale@k, async
ACCURACY_VARIABLES = ("acc", "reward")  # verl's core validation variable: acc when the reward gives one
DEFAULT_UPDATES_PER_STEP = 4  # the paper's: 256 prompts / 64 per mini-batch x 1 epoch


class ReportError(Exception):
    """A run whose logs cannot be read; the message says what was looked for and how to fix it."""


@dataclass
class RunLog:
    name: str
    metrics_path: str
    steps: dict[int, dict[str, float]]
    updates_per_step: int
    updates_source: str
    notes: list[str] = field(default_factory=list)


@dataclass
class RunSummary:
    name: str
    best_step: int | None
    best_updates: int | None
    accuracy: dict[str, float]  # benchmark -> accuracy (0-1) at the best step
    average: float | None
    benchmarks_found: int
    masked_or_clipped_fraction: float | None
    training_steps: int
    notes: list[str]


# ---------------------------------------------------------------------- reading


def metrics_candidates(run: str) -> list[str]:
    if run.endswith(".jsonl"):
        return [run]
    run = run.rstrip(os.sep)
    return [f"{run}.jsonl", os.path.join(run, "metrics.jsonl")]


def updates_per_step_from_ledger(ledger_path: str) -> int | None:
    """u from the stale ledger: a batch generated at step g > 1 carries updates = (g - 1) u."""
    if not os.path.isfile(ledger_path):
        return None
    with open(ledger_path) as f:
        for line in f:
            try:
                generated = json.loads(line)["generated_at"]
            except (ValueError, KeyError, TypeError):
                continue
            if generated.get("global_step", 0) > 1 and generated.get("updates", 0) > 0:
                return generated["updates"] // (generated["global_step"] - 1)
    return None


def load_run(run: str, updates_per_step: int | None = None) -> RunLog:
    if not os.path.exists(run):
        raise ReportError(f"{run}: no such file or directory")
    attempts = attempt_files(run) if os.path.isdir(run) else []
    if attempts:  # one metrics file per attempt (m2po.utils.verl_metrics)
        path, run_dir = os.path.join(run.rstrip(os.sep), ATTEMPTS_DIR), run.rstrip(os.sep)
        files = attempts
    else:
        candidates = metrics_candidates(run)
        path = next((c for c in candidates if os.path.isfile(c)), None)
        if path is None:
            raise ReportError(
                f"{run}: no metrics file (looked for {', '.join(candidates)} and {ATTEMPTS_DIR}/attempt-*.jsonl). "
                "Log with verl's file logger: trainer.logger='[console,file]' and VERL_FILE_LOGGER_PATH or "
                "VERL_FILE_LOGGER_ROOT (the paper scripts do this), or pass the .jsonl file itself"
            )
        # earlier attempts of a resumed run, kept beside the file by the plugin (m2po.verl_integration.metrics_attempts)
        files = [*archived_attempts(path), path]
        # the checkpoint folder: `<folder>.jsonl` beside it, or `<folder>/metrics.jsonl` inside it
        run_dir = os.path.dirname(path) if os.path.basename(path) == "metrics.jsonl" else path[: -len(".jsonl")]
    steps, notes = merge_attempts(files)  # the later attempt wins a step logged twice
    if len(files) > 1:
        notes.insert(0, f"{len(files)} attempts (a crash or a stop, then a resume) merged")
    if not steps:
        raise ReportError(f"{path}: no metrics records in it (is the run still starting?)")
    name = os.path.basename(run_dir.rstrip(os.sep)) or os.path.basename(path)
    if updates_per_step is not None:
        u, source = updates_per_step, "given"
    else:
        inferred = updates_per_step_from_ledger(os.path.join(run_dir, LEDGER_FILE))
        u, source = (inferred, "the stale ledger") if inferred else (DEFAULT_UPDATES_PER_STEP, "the paper's default")
    return RunLog(name=name, metrics_path=path, steps=steps, updates_per_step=u, updates_source=source, notes=notes)


# ---------------------------------------------------------------------- what a run shows


def validation_accuracy(metrics: dict[str, float]) -> dict[str, float]:
    """benchmark -> accuracy, from verl's `val-core/<data source>/<var>/mean@<n>` (acc over reward,
    the largest n)."""
    found: dict[str, tuple[int, int, float]] = {}  # source -> (variable rank, n, value)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) < 4 or parts[0] != "val-core" or not parts[-1].startswith("mean@"):
            continue
        source, variable = "/".join(parts[1:-2]), parts[-2]
        if variable not in ACCURACY_VARIABLES:
            continue
        try:
            n = int(parts[-1].removeprefix("mean@"))
        except ValueError:
            continue
        rank = -ACCURACY_VARIABLES.index(variable)
        if source not in found or (rank, n) > found[source][:2]:
            found[source] = (rank, n, value)
    return {source: value for source, (_, _, value) in found.items()}


def benchmark_average(accuracy: dict[str, float]) -> tuple[float | None, int]:
    """The mean over the paper's benchmarks present (or over every source when none of them is)."""
    paper = [accuracy[b] for b in PAPER_BENCHMARKS if b in accuracy]
    values = paper or list(accuracy.values())
    return (statistics.fmean(values) if values else None), len(paper)


def summarize(run: RunLog) -> RunSummary:
    notes = list(run.notes)
    evaluations = {step: validation_accuracy(m) for step, m in run.steps.items()}
    evaluations = {step: acc for step, acc in evaluations.items() if acc}
    best_step, accuracy, average, found = None, {}, None, 0
    if evaluations:
        # the best step by the average; the earliest among equals
        best_step = max(sorted(evaluations), key=lambda s: benchmark_average(evaluations[s])[0])
        accuracy = evaluations[best_step]
        average, found = benchmark_average(accuracy)
        if found < len(PAPER_BENCHMARKS):
            missing = [b for b in PAPER_BENCHMARKS if b not in accuracy]
            notes.append(
                f"the average is over {found or len(accuracy)} benchmark(s), not the paper's {len(PAPER_BENCHMARKS)} "
                f"(missing: {', '.join(missing)})"
            )
    else:
        notes.append("no validation metrics (val-core/...): set trainer.test_freq > 0 or trainer.val_before_train=true")
    training = [m for step, m in run.steps.items() if step > 0 and CLIP_FRACTION in m]
    fraction = statistics.fmean(m[CLIP_FRACTION] for m in training) if training else None
    if fraction is None:
        notes.append(f"no {CLIP_FRACTION} logged: no training step yet")
    return RunSummary(
        name=run.name,
        best_step=best_step,
        best_updates=None if best_step is None else best_step * run.updates_per_step,
        accuracy=accuracy,
        average=average,
        benchmarks_found=found,
        masked_or_clipped_fraction=fraction,
        training_steps=len(training),
        notes=notes,
    )


# ---------------------------------------------------------------------- output


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def table(summaries: list[RunSummary]) -> str:
    """Table 1 of the paper: rows = runs, columns = benchmarks (accuracy %) + average."""
    columns = [b for b in PAPER_BENCHMARKS if any(b in s.accuracy for s in summaries)]
    columns += sorted({k for s in summaries for k in s.accuracy} - set(columns))
    header = ["run", "best step", *columns, "average", "masked/clipped %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [s.name, "-" if s.best_step is None else str(s.best_step)]
        cells += [_pct(s.accuracy.get(c)) for c in columns]
        cells += [_pct(s.average), _pct(s.masked_or_clipped_fraction, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_section(run: RunLog, summary: RunSummary) -> str:
    lines = [f"## {summary.name}", f"metrics: {run.metrics_path} ({len(run.steps)} steps logged)"]
    if summary.best_step is not None:
        lines.append(
            f"best evaluation: step {summary.best_step} ({summary.best_updates} actor updates, u = "
            f"{run.updates_per_step} from {run.updates_source}), average {_pct(summary.average)}%"
        )
        order = [b for b in PAPER_BENCHMARKS if b in summary.accuracy] + sorted(set(summary.accuracy) - set(PAPER_BENCHMARKS))
        lines += [f"  {name}: {_pct(summary.accuracy[name])}%" for name in order]
    lines.append(
        f"mean masked/clipped fraction over {summary.training_steps} training steps: "
        f"{_pct(summary.masked_or_clipped_fraction, 3)}%"
    )
    lines += [f"note: {note}" for note in summary.notes]
    return "\n".join(lines)


def plot(runs: list[RunLog], out_dir: str) -> list[str]:
    """Four PNGs, one curve per run against actor updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "validation_average.png": ("validation average over the benchmarks (%)", lambda m: 100 * a if (a := benchmark_average(validation_accuracy(m))[0]) is not None else None),
        "masked_or_clipped_fraction.png": ("masked / clipped tokens (%)", lambda m: 100 * m[CLIP_FRACTION] if CLIP_FRACTION in m else None),
        "m2.png": ("M2 of the trust region: before (solid) / after (dashed)", None),
        "staleness.png": ("staleness of the trained batch (actor updates)", lambda m: next((m[k] for k in STALENESS_KEYS if k in m), None)),
    }
    paths = []
    for file_name, (label, value) in figures.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in runs:
            steps = sorted(run.steps)
            x = [step * run.updates_per_step for step in steps]
            if value is None:  # M2 before and after, one colour per run
                before = [(xi, run.steps[s].get(M2_BEFORE)) for xi, s in zip(x, steps)]
                after = [(xi, run.steps[s].get(M2_AFTER)) for xi, s in zip(x, steps)]
                line = _plot_points(ax, before, run.name, "-")
                _plot_points(ax, after, None, "--", color=line.get_color() if line else None)
                continue
            _plot_points(ax, [(xi, value(run.steps[s])) for xi, s in zip(x, steps)], run.name, "-o" if "validation" in file_name else "-")
        ax.set_xlabel("actor updates")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "nothing logged", transform=ax.transAxes, ha="center")
        fig.tight_layout()
        path = os.path.join(out_dir, file_name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_points(ax, points, label, style, color=None):
    points = [(x, y) for x, y in points if y is not None and not math.isnan(y)]
    if not points:
        return None
    xs, ys = zip(*points)
    (line,) = ax.plot(xs, ys, style, label=label, color=color, markersize=3)
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2po report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a run's checkpoint folder or its metrics .jsonl")
    parser.add_argument("--out", default="m2po-report", help="folder for report.md, report.json and the plots")
    parser.add_argument("--updates-per-step", type=int, default=None,
                        help=f"actor updates per step (default: from the stale ledger, else {DEFAULT_UPDATES_PER_STEP})")
    args = parser.parse_args(argv)
    if args.updates_per_step is not None and args.updates_per_step < 1:
        parser.error("--updates-per-step must be >= 1")
    try:
        runs = [load_run(run, args.updates_per_step) for run in args.runs]
    except ReportError as error:
        print(f"m2po report: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"m2po report: error: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 2
    summaries = [summarize(run) for run in runs]
    sections = [run_section(run, summary) for run, summary in zip(runs, summaries)]
    report = "\n\n".join(["# M2PO report", *sections, "## Table 1 (accuracy %, best step of each run)", table(summaries)])
    os.makedirs(args.out, exist_ok=True)
    plots = plot(runs, args.out)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"runs": [asdict(s) for s in summaries]}, f, indent=2)
    print(report)
    print(f"\nwrote {os.path.join(args.out, 'report.md')}, report.json and {len(plots)} plots to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
