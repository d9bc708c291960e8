"""What drives a run's largest accuracy drop: the testbed's per-iteration diagnostics around it.

    python -m m2po.testbed.drop_analysis outputs/testbed-sweep/lr1e-4-noclip
    python -m m2po.testbed.drop_analysis outputs/testbed --methods m2po_stale no_tr_stale --control grpo_stale

For each run of the analysed methods: its largest drop (the evaluation with the largest fall below the
running peak, and the peak before it), then the mean of each diagnostic over the trained iterations in
two windows: `before`, the `--window` iterations up to the peak evaluation, and `drop`, from the peak
evaluation to the trough. The same windows of the control method's run with the same seed (stale GRPO by
default: stale data, a trust region) show what is ordinary for stale training at that point. Writes
drops.md, drops.json and drops.png into the results folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from m2po.testbed.report import LABELS, curve

# (record key, label, how the window reduces it)
DIAGNOSTICS = (
    ("rollout_reward", "reward of the current policy's rollouts", "mean"),
    ("trained_reward", "reward of the stale batch trained on", "mean"),
    ("grad_norm", "gradient norm before clipping (mean)", "mean"),
    ("grad_norm_max", "gradient norm before clipping (largest)", "max"),
    ("testbed/grad_share_trust_region", "gradient share: trust-region tokens", "mean"),
    ("testbed/grad_share_neg_adv_ratio_up", "gradient share: A < 0, r > 1", "mean"),
    ("testbed/grad_share_neg_adv_large_ratio", "gradient share: A < 0, r > 1.2", "mean"),
    ("testbed/max_token_grad_share", "largest single token's gradient share", "mean"),
    ("testbed/max_ratio_max", "largest ratio r", "max"),
    ("testbed/m2_all", "M2 over all tokens (before any mask)", "mean"),
    ("actor/m2po/m2_before", "M2PO's M2 before masking (trust region)", "mean"),
    ("actor/m2po/m2_after", "M2PO's M2 after masking", "mean"),
    ("actor/pg_clipfrac", "masked / clipped fraction", "mean"),
)
DEFAULT_METHODS = ("m2po_stale", "no_tr_stale")
DEFAULT_CONTROL = "grpo_stale"
DEFAULT_WINDOW = 25  # iterations (100 updates)


def largest_drop(records: list[dict], base_accuracy: float) -> dict:
    """The largest fall below the running peak of a run's held-out accuracy (base policy at update 0):
    `drop`, and the `peak_*` and `trough_*` evaluation's iteration (-1 for the base policy), updates and
    accuracy. The peak is the best evaluation at or before the trough."""
    evaluations = [r for r in records if "accuracy" in r]
    iterations = [-1] + [r["iteration"] for r in evaluations]
    updates, accuracy = curve(records)
    updates = np.concatenate([[0], updates])
    accuracy = np.concatenate([[base_accuracy], accuracy])
    fall = np.maximum.accumulate(accuracy) - accuracy
    trough = int(np.argmax(fall))
    peak = int(np.argmax(accuracy[: trough + 1]))
    return {"drop": float(fall[trough]),
            "peak_iteration": int(iterations[peak]), "peak_updates": int(updates[peak]), "peak_accuracy": float(accuracy[peak]),
            "trough_iteration": int(iterations[trough]), "trough_updates": int(updates[trough]),
            "trough_accuracy": float(accuracy[trough])}


def window_stats(records: list[dict], first: int, last: int) -> dict[str, float]:
    """Each diagnostic over the trained iterations `first <= iteration <= last` (NaN where absent)."""
    trained = [r for r in records if "trained_hash" in r and first <= r["iteration"] <= last]
    out = {}
    for key, _, reduce in DIAGNOSTICS:
        values = [r[key] for r in trained if key in r]
        out[key] = float((np.max if reduce == "max" else np.mean)(values)) if values else float("nan")
    out["iterations"] = len(trained)
    return out


def analyse_run(records: list[dict], base_accuracy: float, window: int, control: list[dict] | None = None) -> dict:
    drop = largest_drop(records, base_accuracy)
    before = (drop["peak_iteration"] - window + 1, drop["peak_iteration"])
    during = (drop["peak_iteration"] + 1, drop["trough_iteration"])
    result = dict(drop, before=window_stats(records, *before), during=window_stats(records, *during))
    if control is not None:
        result["control_before"] = window_stats(control, *before)
        result["control_during"] = window_stats(control, *during)
    return result


SPIKE_NORM = 3.0  # an iteration "spikes" when its largest gradient norm before clipping is above this


def spike_stats(seeds: dict[int, list[dict]], threshold: float = SPIKE_NORM) -> dict[str, float]:
    """Over every trained iteration of a method's runs: the fraction whose largest gradient norm (before
    clipping) is above `threshold`, the largest norm, and the mean share of the gradient carried by
    negative-advantage tokens with r > 1.2 at those iterations and at the others."""
    trained = [r for records in seeds.values() for r in records if "grad_norm_max" in r]
    norms = np.array([r["grad_norm_max"] for r in trained])
    share = np.array([r["testbed/grad_share_neg_adv_large_ratio"] for r in trained])
    spikes = norms > threshold

    def mean(values):
        return float(values.mean()) if len(values) else float("nan")

    return {"spike_fraction": mean(spikes.astype(float)), "spikes": int(spikes.sum()), "iterations": len(trained),
            "largest_norm": float(norms.max()) if len(norms) else float("nan"),
            "neg_adv_large_ratio_share_at_spikes": mean(share[spikes]),
            "neg_adv_large_ratio_share_otherwise": mean(share[~spikes])}


def _fmt(value: float) -> str:
    if np.isnan(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 0.1 else f"{value:.3f}"


def analyse(out_dir: str, methods=DEFAULT_METHODS, control: str | None = DEFAULT_CONTROL,
            window: int = DEFAULT_WINDOW) -> dict:
    from m2po.testbed.sweep import load_runs

    runs, base_accuracy, config = load_runs(out_dir)
    unknown = [m for m in (*methods, *([control] if control else [])) if m not in runs]
    if unknown:
        raise ValueError(f"{out_dir} has no runs of {unknown}; it has {sorted(runs)}")
    results = {m: {seed: analyse_run(records, base_accuracy, window, runs[control][seed] if control else None)
                   for seed, records in runs[m].items()} for m in methods}
    spikes = {m: spike_stats(seeds) for m, seeds in runs.items()}
    with open(os.path.join(out_dir, "drops.json"), "w") as f:
        json.dump({"window": window, "control": control, "runs": results, "spikes": spikes}, f, indent=1)
    rl = config["rl"]
    lines = [f"# Largest accuracy drops in {out_dir}", "",
             f"lr {rl['lr']}, grad clip {rl['grad_clip']}, s = {rl['staleness_updates']} updates, "
             f"{rl['iterations']} iterations ({rl['mini_batches']} updates each). Per run: the largest fall below "
             f"the running peak; diagnostics averaged (largest: max) over the trained iterations in the {window} "
             "iterations up to the peak evaluation (`before`) and from the peak to the trough (`drop`)"
             + (f"; `{control}` = the {LABELS[control]} run with the same seed, same windows." if control else "."), ""]
    lines += [f"## Gradient-norm spikes (largest norm of an iteration, before clipping, above {SPIKE_NORM:g})", "",
              "| method | iterations with a spike | largest norm | gradient share of A < 0, r > 1.2 tokens: at spikes / "
              "otherwise |", "|---|---|---|---|"]
    for method, st in spikes.items():
        lines.append(f"| {LABELS[method]} | {st['spike_fraction']:.1%} ({st['spikes']} of {st['iterations']}) | "
                     f"{_fmt(st['largest_norm'])} | {_fmt(st['neg_adv_large_ratio_share_at_spikes'])} / "
                     f"{_fmt(st['neg_adv_large_ratio_share_otherwise'])} |")
    lines.append("")
    for method, seeds in results.items():
        for seed, r in seeds.items():
            lines += [f"## {LABELS[method]}, seed {seed}: {r['peak_accuracy']:.3f} at {r['peak_updates']} updates -> "
                      f"{r['trough_accuracy']:.3f} at {r['trough_updates']} (drop {r['drop']:.3f})", ""]
            columns = ["before", "during"] + (["control_before", "control_during"] if control else [])
            names = {"before": "before", "during": "drop", "control_before": f"{control} before",
                     "control_during": f"{control} drop"}
            lines += ["| diagnostic | " + " | ".join(names[c] for c in columns) + " |",
                      "|---" * (len(columns) + 1) + "|"]
            for key, label, _ in DIAGNOSTICS:
                lines.append(f"| {label} | " + " | ".join(_fmt(r[c][key]) for c in columns) + " |")
            lines.append("")
    lines += ["![diagnostics around the drops](drops.png)", ""]
    with open(os.path.join(out_dir, "drops.md"), "w") as f:
        f.write("\n".join(lines))
    _plot(os.path.join(out_dir, "drops.png"), runs, base_accuracy, results, control)
    return results


# (keys: solid, dashed), y label, log scale, smoothing over 5 iterations ("mean" or "max": spikes stay visible)
PANELS = (
    (("rollout_reward", "trained_reward"), "reward: current rollouts / stale batch", False, "mean"),
    (("grad_norm_max",), "largest gradient norm (before clipping)", True, "max"),
    (("testbed/grad_share_neg_adv_large_ratio", "testbed/max_token_grad_share"),
     "gradient share: A<0, r>1.2 / largest token", True, "max"),
    (("actor/m2po/m2_before", "testbed/m2_all"), "M2: trust region / all tokens", True, "mean"),
)


def _smooth(values, how: str, width: int = 5):
    """Centred running mean or max over `width` iterations (NaN-free input)."""
    values = np.asarray(values, dtype=float)
    if len(values) < width:
        return values
    if how == "mean":
        return np.convolve(values, np.ones(width) / width, mode="same")
    padded = np.pad(values, width // 2, mode="edge")
    return np.lib.stride_tricks.sliding_window_view(padded, width).max(axis=1)


def _plot(path, runs, base_accuracy, results, control):
    from m2po.testbed.report import COLOURS, _pyplot, save_figure

    plt = _pyplot()
    columns = [(m, s) for m, seeds in results.items() for s in seeds]
    fig, axes = plt.subplots(1 + len(PANELS), len(columns), figsize=(3.4 * len(columns), 1.9 * (1 + len(PANELS))),
                             sharex=True, squeeze=False)
    for col, (method, seed) in enumerate(columns):
        shown = [method] + ([control] if control else [])
        r = results[method][seed]
        for row in range(1 + len(PANELS)):
            axes[row][col].axvspan(r["peak_updates"], r["trough_updates"], color="tab:orange", alpha=0.15)
            axes[row][col].grid(alpha=0.3)
        for m in shown:
            updates, accuracy = curve(runs[m][seed])
            axes[0][col].plot(np.concatenate([[0], updates]), np.concatenate([[base_accuracy], accuracy]),
                              color=COLOURS[m], label=LABELS[m])
        axes[0][col].set_title(f"{LABELS[method]}, seed {seed}", fontsize=9)
        for row, (keys, title, log_scale, how) in enumerate(PANELS, start=1):
            ax = axes[row][col]
            for m in shown:
                trained = [x for x in runs[m][seed] if "trained_hash" in x]
                for key, style in zip(keys, ("-", "--")):
                    values = [x.get(key, np.nan) for x in trained]
                    if not np.all(np.isnan(values)):
                        ax.plot([x["updates"] for x in trained], _smooth(values, how), style, color=COLOURS[m],
                                linewidth=1)
            if log_scale:
                ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(title, fontsize=7)
        axes[-1][col].set_xlabel("model updates")
    axes[0][0].set_ylabel("held-out accuracy", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Around each run's largest drop (shaded); solid / dashed = first / second series of a panel; "
                 "running mean (max for norms and shares) over 5 iterations",
                 fontsize=9)
    save_figure(fig, path, dpi=72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2po.testbed.drop_analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="a finished testbed results folder (with summary.json)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(LABELS))
    parser.add_argument("--control", default=DEFAULT_CONTROL, choices=sorted(LABELS) + ["none"],
                        help="the run shown beside each analysed one, same seed and windows ('none': no control)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="iterations before the peak (default 25)")
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be >= 1")
    try:
        analyse(args.out_dir, tuple(args.methods), None if args.control == "none" else args.control, args.window)
    except ValueError as error:
        parser.error(str(error))
    print(f"[drops] {os.path.join(args.out_dir, 'drops.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
