"""Compare two results folders of the main job method by method, with the tolerance rule of the verl
cross-check (docs/testbed-verl.md): for the AUC and the final accuracy,

    |other mean - reference mean| <= 2 x (reference seed-to-seed sd) + 2 x (standard error of the evaluation)

    python -m m2po.testbed.compare docs/testbed/default outputs/testbed-m2-micro4

For a setting changed in one place (e.g. `--m2-micro-batch K`, M2PO's cut per micro-batch): the
methods both folders ran, a table on stdout and compare.json in the other folder.
"""

from __future__ import annotations

import argparse
import json
import os

from m2po.testbed.verl_report import crosscheck


def load_summary(results_dir: str) -> dict:
    with open(os.path.join(results_dir, "summary.json")) as f:
        return json.load(f)


def compare(reference_dir: str, other_dir: str) -> dict:
    """method -> metric -> both means, the reference's sd, the tolerance, the difference, within."""
    reference, other = load_summary(reference_dir), load_summary(other_dir)
    rl = reference["config"]["rl"]
    if {k: v for k, v in rl.items() if k != "m2_micro_batch"} != {
        k: v for k, v in other["config"]["rl"].items() if k != "m2_micro_batch"
    }:
        raise SystemExit(f"{reference_dir} and {other_dir} differ in more RL settings than the mask scope")
    evaluations = rl["iterations"] // rl["eval_every"]
    runs = {name: {int(seed): s for seed, s in seeds.items()} for name, seeds in reference["runs"].items()}
    others = {name: {int(seed): s for seed, s in seeds.items()} for name, seeds in other["runs"].items()}
    check = crosscheck(others, runs, rl["eval_problems"], evaluations)
    return {method: {metric: {k.replace("verl", "other").replace("testbed", "reference"): v for k, v in row.items()}
                     for metric, row in rows.items()} for method, rows in check.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2po.testbed.compare", description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("other")
    args = parser.parse_args(argv)
    result = compare(args.reference, args.other)
    print(f"reference: {args.reference}; other: {args.other}\n")
    print("| method | metric | reference mean (sd, seeds) | other mean (seeds) | difference | tolerance | within |")
    print("|---|---|---|---|---|---|---|")
    for method, rows in result.items():
        for metric, r in rows.items():
            print(f"| {method} | {metric} | {r['reference_mean']:.3f} ({r['reference_sd']:.3f}, {r['reference_seeds']}) | "
                  f"{r['other_mean']:.3f} ({r['other_seeds']}) | {r['difference']:+.3f} | {r['tolerance']:.3f} | "
                  f"{'yes' if r['within'] else 'NO'} |")
    with open(os.path.join(args.other, "compare.json"), "w") as f:
        json.dump({"reference": args.reference, "other": args.other, "methods": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
