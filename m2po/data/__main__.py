"""python -m m2po.data [--out data] [--only NAME ...] [--source NAME=FILE ...]

Writes the paper's datasets as verl parquet files: data/<name>/{train,test}.parquet.
Downloads from the Hugging Face hub unless a local file is given for a dataset.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from m2po.data.math_datasets import DATASETS, preprocess


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2po.data", description=__doc__.splitlines()[2])
    parser.add_argument("--out", default="data", help="output directory (default: data)")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), help="datasets to write (default: all)")
    parser.add_argument(
        "--source", nargs="+", default=[], metavar="NAME=FILE", help="read NAME from a local .jsonl/.json/.parquet"
    )
    args = parser.parse_args(argv)
    sources = {}
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or name not in DATASETS:
            parser.error(f"--source takes NAME=FILE with NAME in {sorted(DATASETS)}, got {item!r}")
        sources[name] = path
    names = args.only or list(DATASETS)
    for name in tqdm(names, desc="datasets", disable=None):
        path = preprocess(name, args.out, sources.get(name))
        tqdm.write(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
