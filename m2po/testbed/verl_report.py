"""Results of `python -m m2po.testbed --engine verl`, and the cross-check against the testbed's loop.

What verl logged (its file logger, every attempt merged) becomes the testbed's per-run records
(`updates`, `accuracy`, the loss's statistics), so both engines are summarised by the same
`m2po.testbed.report.run_summary`. The cross-check compares, per method that both engines ran, the
mean over seeds of the AUC and the final accuracy, against a tolerance fixed before the runs
(docs/testbed-verl.md):

    |verl mean - testbed mean| <= 2 x (testbed seed-to-seed sd) + 2 x (standard error of the evaluation)

The evaluation's standard error is the binomial one of `eval_problems` samples at the testbed's
accuracy: for the final accuracy that of one evaluation, for the AUC (the mean of n evaluations,
whose sampling is independent) that divided by sqrt(n). A third comparison takes the final policies
themselves: both engines' are scored by the testbed's `evaluate` with the same `FINAL_DRAWS` sampling
draws (`final_reevaluated`, standard error divided by sqrt(FINAL_DRAWS)).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from m2po.testbed.report import COLOURS, LABELS, _finish, _nanmean, _pyplot, run_summary, seed_rows
from m2po.testbed.config import VERL_METHODS
from m2po.testbed.verl_engine import accuracy_key, attempts_wall_s, read_run

# verl's names for what the testbed logs under the same meaning
LOSS_KEYS = ("actor/pg_clipfrac", "actor/m2po/m2_before", "actor/m2po/m2_after", "actor/grad_norm")
STALENESS_KEYS = ("stale/staleness_updates_mean", "stale/staleness_updates")
VERL_COLOURS = {**COLOURS, "grpo_async": "tab:purple", "m2po_async": "tab:olive"}
COMPARED = ("auc", "final", "final_reevaluated")
FINAL_DRAWS = 8  # evaluations of each final policy (x eval_problems samples)


def verl_records(steps: dict[int, dict[str, float]], config) -> tuple[list[dict], float | None]:
    """(testbed-style records, the base policy's accuracy measured at step 0) from verl's metrics.
    Step s >= 1 has trained s x u updates; its record holds the loss statistics of that step's updates
    (verl's means over them) and, at evaluation steps, `accuracy`."""
    u, key = config.rl.mini_batches, accuracy_key(config)
    records = []
    for step in sorted(s for s in steps if s > 0):
        metrics = steps[step]
        record = {"iteration": step - 1, "updates": step * u, "trained_hash": step}
        record.update({k: metrics[k] for k in LOSS_KEYS if k in metrics})
        if "actor/m2po/m2_all_before" in metrics:
            record["testbed/m2_all"] = metrics["actor/m2po/m2_all_before"]
        staleness = next((metrics[k] for k in STALENESS_KEYS if k in metrics), None)
        if staleness is not None:
            record["stale/staleness_updates"] = staleness
        if key in metrics:
            record["accuracy"] = metrics[key]
        records.append(record)
    base = steps.get(0, {}).get(key)
    return records, base


def load_verl_runs(out_dir: str, config) -> dict[str, dict[int, dict]]:
    """method -> seed -> {"records", "base_accuracy", "notes"} for every finished verl run."""
    runs: dict[str, dict[int, dict]] = {}
    for method in config.methods:
        for seed in config.seeds:
            run_dir = os.path.join(out_dir, "runs", f"{method}-seed{seed}")
            if not os.path.isdir(run_dir):
                continue
            steps, notes = read_run(run_dir)
            records, base = verl_records(steps, config)
            runs.setdefault(method, {})[seed] = {"records": records, "base_accuracy": base, "notes": notes,
                                                 "wall_s": attempts_wall_s(run_dir)}
    return runs


def summaries(runs: dict[str, dict[int, dict]], fallback_base: float) -> dict[str, dict[int, dict]]:
    out = {}
    for method, seeds in runs.items():
        out[method] = {}
        for seed, run in seeds.items():
            base = run["base_accuracy"] if run["base_accuracy"] is not None else fallback_base
            summary = run_summary(run["records"], base)
            staleness = [r["stale/staleness_updates"] for r in run["records"] if "stale/staleness_updates" in r]
            summary["staleness_mean"] = float(np.mean(staleness)) if staleness else float("nan")
            summary["staleness_max"] = float(np.max(staleness)) if staleness else float("nan")
            grad_norms = [r["actor/grad_norm"] for r in run["records"] if "actor/grad_norm" in r]
            summary["grad_norm_max"] = float(np.max(grad_norms)) if grad_norms else float("nan")
            summary["base_accuracy"] = base
            summary["wall_min"] = run["wall_s"] / 60 if run.get("wall_s") else float("nan")
            out[method][seed] = summary
    return out


# ---------------------------------------------------------------------- tolerance


def evaluation_standard_error(accuracy: float, problems: int, evaluations: int = 1) -> float:
    """Binomial standard error of the mean of `evaluations` independent evaluations on `problems`."""
    p = min(max(accuracy, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / problems) / math.sqrt(evaluations)


def final_policy_accuracy(model_dir: str, config, draws: int = FINAL_DRAWS) -> float:
    """Mean accuracy of a saved policy over `draws` evaluations of the held-out set (the same draws for
    every policy, so both engines' final policies are scored on equal terms)."""
    import torch

    from m2po.testbed.evaluation import evaluate
    from m2po.testbed.model import load_pretrained

    torch.set_num_threads(1)
    model = load_pretrained(model_dir).eval()
    task, problems = config.task, config.rl.eval_problems
    return float(np.mean([evaluate(model, task, problems, seed=0, draw=("final", d)) for d in range(draws)]))


def crosscheck(verl: dict[str, dict[int, dict]], testbed: dict[str, dict[str, dict]], eval_problems: int,
               evaluations: int, final_draws: int = FINAL_DRAWS) -> dict[str, dict]:
    """Per method both engines ran, per compared metric both have: both means, the testbed's seed sd,
    the evaluation's standard error, the tolerance, the difference and whether it is within."""
    averaged = {"auc": evaluations, "final": 1, "final_reevaluated": final_draws}
    result = {}
    for method in verl:
        if method not in testbed:
            continue
        rows = {}
        for metric in COMPARED:
            testbed_values = [s[metric] for s in testbed[method].values() if metric in s]
            verl_values = [s[metric] for s in verl[method].values() if metric in s]
            if not testbed_values or not verl_values:
                continue
            testbed_mean, verl_mean = float(np.mean(testbed_values)), float(np.mean(verl_values))
            sd = float(np.std(testbed_values, ddof=1)) if len(testbed_values) > 1 else float("nan")
            se = evaluation_standard_error(testbed_mean, eval_problems, averaged[metric])
            tolerance = 2 * (0.0 if math.isnan(sd) else sd) + 2 * se
            rows[metric] = {
                "testbed_mean": testbed_mean, "testbed_sd": sd, "testbed_seeds": len(testbed_values),
                "verl_mean": verl_mean, "verl_seeds": len(verl_values), "evaluation_se": se,
                "tolerance": tolerance, "difference": verl_mean - testbed_mean,
                "within": abs(verl_mean - testbed_mean) <= tolerance,
            }
        result[method] = rows
    return result


# ---------------------------------------------------------------------- output


def reevaluate_final_policies(rows: dict[str, dict], final_models: dict[str, dict], config) -> None:
    """Add `final_reevaluated` to each summary whose run left a final policy (`final_models`: method ->
    seed -> folder)."""
    for method, seeds in final_models.items():
        for seed, model_dir in seeds.items():
            if method in rows and seed in rows[method] and model_dir and os.path.isdir(model_dir):
                rows[method][seed]["final_reevaluated"] = final_policy_accuracy(model_dir, config)


def write_verl_report(out_dir: str, config, runs: dict[str, dict[int, dict]], testbed_summary: dict | None,
                      testbed_runs: dict[str, dict[int, list[dict]]] | None, command: str, elapsed_s: float,
                      verl_final_models: dict | None = None, testbed_final_models: dict | None = None) -> str:
    """summary.md / summary.json / accuracy.png (+ crosscheck.png and staleness.png); returns summary.md.
    `*_final_models`: method -> seed -> the run's final policy folder, re-evaluated for the cross-check."""
    testbed_base = testbed_summary["base_accuracy"] if testbed_summary else float("nan")
    rows = summaries(runs, fallback_base=testbed_base)
    reevaluate_final_policies(rows, verl_final_models or {}, config)
    evaluations = math.ceil(config.rl.iterations / config.rl.eval_every)
    check = {}
    if testbed_summary:
        testbed_rows = {m: {int(s): dict(v) for s, v in seeds.items()} for m, seeds in testbed_summary["runs"].items()}
        reevaluate_final_policies(testbed_rows, testbed_final_models or {}, config)
        check = crosscheck(rows, testbed_rows, config.rl.eval_problems, evaluations)
    notes = {f"{m}-seed{s}": run["notes"] for m, seeds in runs.items() for s, run in seeds.items() if run["notes"]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"runs": rows, "testbed_runs": testbed_rows if testbed_summary else None, "crosscheck": check,
                   "config": config.to_json(), "command": command, "elapsed_s": elapsed_s, "notes": notes},
                  f, indent=1, default=float)
    _plot_accuracy(out_dir, runs, rows)
    if testbed_runs:
        _plot_crosscheck(out_dir, runs, testbed_runs, testbed_base)
    _plot_staleness(out_dir, runs)

    rl = config.rl
    lines = [
        "# The testbed's experiment through verl's trainer",
        "",
        f"Command: `{command}` ({elapsed_s / 60:.1f} min). Each run is verl's `main_ppo` on CPU (`+cpu=tiny "
        f"+testbed=verl`): {rl.prompts_per_iteration} prompts x {rl.samples_per_prompt} samples per step, "
        f"{rl.mini_batches} updates per step, lr {rl.lr}, grad clip {rl.grad_clip}, stale@k runs at "
        f"k={rl.staleness_updates} updates, tau {rl.m2_threshold}, {rl.iterations} steps, verl's validation on the "
        f"testbed's {rl.eval_problems} held-out problems every {rl.eval_every} steps (temperature 1).",
        "",
        "| method | seed | base (step 0) | peak | final | final, re-evaluated | AUC | worst drop | masked/clipped "
        "| M2 before -> after | staleness mean (max) | largest grad norm | wall (min, all attempts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k for seeds in rows.values() for s in seeds.values() for k in s})
    lines += seed_rows(rows, _label, _cells, keys, stats_from=2)
    lines += ["", "![accuracy](accuracy.png)", "", "![staleness](staleness.png)", ""]
    if check:
        lines += crosscheck_table(check, rows, testbed_rows)
        lines += ["", "![verl vs testbed](crosscheck.png)", ""]
    elif testbed_summary is None:
        lines += ["No testbed results with the same configuration to compare with: run `make main-job` "
                  "(`python -m m2po.testbed`) first.", ""]
    for run, run_notes in notes.items():
        lines += [f"- {run}: {note}" for note in run_notes]
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def crosscheck_table(check: dict, verl_rows: dict, testbed_rows: dict) -> list[str]:
    lines = [
        "## Cross-check against the testbed's loop",
        "",
        "Tolerance (fixed before the runs): |verl mean - testbed mean| <= 2 x testbed seed sd + 2 x the "
        f"evaluation's standard error. final_reevaluated: each run's final policy scored by the testbed's "
        f"`evaluate`, the same {FINAL_DRAWS} draws x the held-out set for every policy.",
        "",
        "| method | metric | testbed mean (sd, seeds) | verl mean (seeds) | difference | tolerance | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, metrics in check.items():
        for metric, c in metrics.items():
            lines.append(
                f"| {_label(method)} | {metric} | {c['testbed_mean']:.3f} ({c['testbed_sd']:.3f}, {c['testbed_seeds']}) "
                f"| {c['verl_mean']:.3f} ({c['verl_seeds']}) | {c['difference']:+.3f} | {c['tolerance']:.3f} "
                f"| {'yes' if c['within'] else '**no**'} |"
            )
    lines += [
        "",
        "| method | masked/clipped: testbed / verl | M2 before masking: testbed / verl | M2 after: testbed / verl |",
        "|---|---|---|---|",
    ]
    for method in check:
        t = list(testbed_rows[method].values())
        v = list(verl_rows[method].values())
        cells = []
        for key, fmt in (("masked_fraction", "{:.2%}"), ("m2_before", "{:.3f}"), ("m2_after", "{:.3f}")):
            cells.append(f"{_fmt(fmt, _nanmean([s[key] for s in t]))} / {_fmt(fmt, _nanmean([s[key] for s in v]))}")
        lines.append(f"| {_label(method)} | " + " | ".join(cells) + " |")
    return lines


def _fmt(fmt: str, value: float) -> str:
    return "-" if value is None or math.isnan(value) else fmt.format(value)


def _label(method: str) -> str:
    return VERL_METHODS[method].label if method in VERL_METHODS else LABELS.get(method, method)


def _cells(s: dict) -> str:
    staleness = "-" if math.isnan(s["staleness_mean"]) else f"{s['staleness_mean']:.1f} ({s['staleness_max']:.0f})"
    m2 = "-" if math.isnan(s["m2_before"]) else f"{s['m2_before']:.3f} -> {s['m2_after']:.3f}"
    return (f"{_fmt('{:.3f}', s['base_accuracy'])} | {s['peak']:.3f} | {s['final']:.3f} | "
            f"{_fmt('{:.3f}', s.get('final_reevaluated', float('nan')))} | {s['auc']:.3f} | "
            f"{s['worst_drop']:.3f} | {_fmt('{:.2%}', s['masked_fraction'])} | {m2} | {staleness} | "
            f"{_fmt('{:.2f}', s['grad_norm_max'])} | {_fmt('{:.1f}', s.get('wall_min', float('nan')))}")


def _curve(run: dict) -> tuple[np.ndarray, np.ndarray]:
    points = [(0, run["base_accuracy"])] if run["base_accuracy"] is not None else []
    points += [(r["updates"], r["accuracy"]) for r in run["records"] if "accuracy" in r]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _plot_accuracy(out_dir, runs, rows):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for method, seeds in runs.items():
        curves = [_curve(run) for run in seeds.values()]
        length = min(len(u) for u, _ in curves)
        if length == 0:
            continue
        mean = np.mean([a[:length] for _, a in curves], axis=0)
        ax.plot(curves[0][0][:length], mean, color=VERL_COLOURS.get(method), label=_label(method), linewidth=2,
                linestyle="--" if VERL_METHODS[method].asynchronous else "-")
    _finish(fig, ax, os.path.join(out_dir, "accuracy.png"), "held-out accuracy (verl validation)",
            "verl's trainer: accuracy vs. model updates (mean over seeds)")


def _plot_crosscheck(out_dir, runs, testbed_runs, testbed_base):
    """One panel per method both engines ran: the testbed's seeds (band: min-max, line: mean) and verl's."""
    from m2po.testbed.report import curve

    methods = [m for m in runs if m in testbed_runs]
    if not methods:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        testbed_curves = [curve(records) for records in testbed_runs[method].values()]
        length = min(len(u) for u, _ in testbed_curves)
        updates = np.concatenate([[0], testbed_curves[0][0][:length]])
        accuracy = np.stack([np.concatenate([[testbed_base], a[:length]]) for _, a in testbed_curves])
        ax.fill_between(updates, accuracy.min(axis=0), accuracy.max(axis=0), color="tab:gray", alpha=0.3)
        ax.plot(updates, accuracy.mean(axis=0), color="tab:gray", linewidth=2, label="testbed loop (seeds)")
        for seed, run in sorted(runs[method].items()):
            x, y = _curve(run)
            ax.plot(x, y, linewidth=1.2, label=f"verl's trainer, seed {seed}")  # matplotlib's cycle: not gray
        ax.set_title(_label(method), fontsize=9)
        ax.set_xlabel("model updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "crosscheck.png"), dpi=110)
    plt.close(fig)


def _plot_staleness(out_dir, runs):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for method, seeds in runs.items():
        for seed, run in sorted(seeds.items()):
            points = [(r["updates"], r["stale/staleness_updates"]) for r in run["records"] if "stale/staleness_updates" in r]
            if points and any(y for _, y in points):
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=VERL_COLOURS.get(method), label=f"{_label(method)} seed {seed}", linewidth=1)
    _finish(fig, ax, os.path.join(out_dir, "staleness.png"), "staleness (actor updates, mean per step)",
            "Staleness of the trained data")
