"""Results of a testbed experiment: summary table (markdown + JSON) and paper-style plots."""

from __future__ import annotations

import json
import os

import numpy as np

LABELS = {
    "grpo_s0": "GRPO, on-policy (s=0)",
    "grpo_stale": "GRPO, stale",
    "no_tr_stale": "GRPO no trust region, stale",
    "m2po_stale": "M2PO, stale",
}
COLOURS = {"grpo_s0": "tab:gray", "grpo_stale": "tab:blue", "no_tr_stale": "tab:red", "m2po_stale": "tab:green"}


def curve(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(model updates, held-out accuracy) at each evaluation."""
    points = [(r["updates"], r["accuracy"]) for r in records if "accuracy" in r]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def run_summary(records: list[dict], base_accuracy: float) -> dict:
    updates, accuracy = curve(records)
    with_base = np.concatenate([[base_accuracy], accuracy])
    running_peak = np.maximum.accumulate(with_base)
    trained = [r for r in records if "trained_hash" in r]

    def mean_of(key):
        values = [r[key] for r in trained if key in r]
        return float(np.mean(values)) if values else float("nan")

    return {
        "peak": float(with_base.max()),
        "final": float(with_base[-1]),
        # Mean accuracy over the evaluations (a normalised area under the accuracy curve).
        "auc": float(accuracy.mean()) if len(accuracy) else float("nan"),
        "worst_drop": float((running_peak - with_base).max()),
        "masked_fraction": mean_of("actor/pg_clipfrac"),
        "m2_before": mean_of("actor/m2po/m2_before"),
        "m2_after": mean_of("actor/m2po/m2_after"),
        # Any method: mean (log r)^2 of the trained batch before each update, over all valid tokens
        # and over the answer tokens (rl.second_moments).
        "m2_all": mean_of("testbed/m2_all"),
        "m2_answer": mean_of("testbed/m2_answer"),
        "updates": int(records[-1]["updates"]) if records else 0,
    }


SUMMARY_KEYS = ("peak", "final", "auc", "worst_drop", "masked_fraction", "m2_before", "m2_after", "m2_all", "m2_answer")


def _nanmean(values):
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _nanstd(values):
    values = [v for v in values if not np.isnan(v)]
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def _cells(s: dict) -> str:
    return (f"{s['peak']:.3f} | {s['final']:.3f} | {s['auc']:.3f} | {s['worst_drop']:.3f} | {s['masked_fraction']:.2%} | "
            f"{s['m2_before']:.3f} | {s['m2_after']:.3f} | {s['m2_all']:.4f} | {s['m2_answer']:.4f}")


def write_report(out_dir: str, base_accuracy: float, runs: dict[str, dict[int, list[dict]]], config: dict,
                 command: str, elapsed_s: float) -> str:
    """Write summary.md, summary.json, accuracy.png, masked_fraction.png; returns summary.md's path."""
    rows = {method: {seed: run_summary(records, base_accuracy) for seed, records in seeds.items()}
            for method, seeds in runs.items()}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({"base_accuracy": base_accuracy, "runs": rows, "config": config, "command": command,
                   "elapsed_s": elapsed_s}, f, indent=1)
    _plot_accuracy(out_dir, base_accuracy, runs)
    _plot_masked(out_dir, runs)

    rl = config["rl"]
    lines = [
        "# M2PO CPU testbed results",
        "",
        f"Command: `{command}` ({elapsed_s / 60:.1f} min). Task: {_describe_task(config['task'])}; "
        f"{rl['prompts_per_iteration']} prompts x {rl['samples_per_prompt']} samples per iteration, "
        f"{rl['mini_batches']} updates per iteration, lr {rl['lr']}, grad clip {rl['grad_clip']}, "
        f"stale runs at s={rl['staleness_updates']} updates ({rl['warmup']} warm-up), tau {rl['m2_threshold']}, "
        f"{rl['iterations']} iterations, held-out accuracy on {rl['eval_problems']} problems (temperature 1).",
        "",
        f"Base policy accuracy: {base_accuracy:.3f}",
        "",
        "| method | seed | peak | final | AUC | worst drop after peak | masked/clipped tokens | M2 before | M2 after "
        "| M2 all tokens | M2 answer tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += seed_rows(rows, LABELS.__getitem__, _cells, SUMMARY_KEYS)
    lines += [
        "",
        "M2 before/after: M2PO's statistic (trust-region tokens, per mini-batch). M2 all tokens / answer tokens: "
        "the trained batch's mean (log r)^2 before each update, for every method. sd: seed-to-seed standard deviation.",
        "",
        "![accuracy](accuracy.png)", "", "![masked fraction](masked_fraction.png)", "",
    ]
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def seed_rows(rows: dict[str, dict], label, cells, keys, stats_from: int = 1) -> list[str]:
    """Markdown rows: one per (method, seed) of `rows` (method -> seed -> summary), then the mean and
    seed-to-seed sd of each of `keys` per method when it has at least `stats_from` seeds."""
    lines = []
    for method, seeds in rows.items():
        for seed, s in sorted(seeds.items()):
            lines.append(f"| {label(method)} | {seed} | " + cells(s) + " |")
        if len(seeds) >= stats_from:
            for name, reduce in (("mean", _nanmean), ("sd", _nanstd)):
                stat = {k: reduce([s.get(k, float("nan")) for s in seeds.values()]) for k in keys}
                lines.append(f"| **{label(method)}** | {name} | " + cells(stat) + " |")
    return lines


def _describe_task(task: dict) -> str:
    from m2po.testbed.task import TASKS

    fields = {k: v for k, v in task.items() if k != "name"}
    return TASKS[task.get("name", "addition")](**fields).describe()


def _plot_accuracy(out_dir, base_accuracy, runs):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for method, seeds in runs.items():
        curves = [curve(records) for records in seeds.values()]
        length = min(len(u) for u, _ in curves)
        # Every curve starts from the shared base policy at update 0.
        updates = np.concatenate([[0], curves[0][0][:length]])
        accuracies = np.stack([np.concatenate([[base_accuracy], a[:length]]) for _, a in curves])
        colour = COLOURS[method]
        ax.plot(updates, accuracies.mean(axis=0), color=colour, label=LABELS[method], linewidth=2)
        if len(curves) > 1:
            ax.fill_between(updates, accuracies.min(axis=0), accuracies.max(axis=0), color=colour, alpha=0.15)
    ax.axhline(base_accuracy, color="black", linestyle=":", linewidth=1, label="base policy")
    _finish(fig, ax, os.path.join(out_dir, "accuracy.png"), "held-out accuracy",
            "Accuracy vs. model updates (mean; band = min-max over seeds)")


def _plot_masked(out_dir, runs):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for method, seeds in runs.items():
        if method == "no_tr_stale":
            continue  # nothing is ever masked
        series = []
        for records in seeds.values():
            trained = [r for r in records if "actor/pg_clipfrac" in r]
            series.append(([r["updates"] for r in trained], [r["actor/pg_clipfrac"] for r in trained]))
        length = min(len(u) for u, _ in series)
        values = np.mean([v[:length] for _, v in series], axis=0)
        window = max(1, length // 30)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(series[0][0][window - 1 : length], smooth * 100, color=COLOURS[method], label=LABELS[method])
    _finish(fig, ax, os.path.join(out_dir, "masked_fraction.png"), "clipped / masked tokens (%)",
            "Fraction of tokens the trust region removes (GRPO: clipped, M2PO: masked)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, path, ylabel, title):
    ax.set_xlabel("model updates")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
