"""The paper's datasets as verl-format parquet files (download on users' machines)."""

from m2po.data.math_datasets import DATASETS, PAPER_BENCHMARKS, PROMPT_TEMPLATE, DatasetSpec, preprocess, to_verl_rows

__all__ = ["DATASETS", "PAPER_BENCHMARKS", "PROMPT_TEMPLATE", "DatasetSpec", "preprocess", "to_verl_rows"]
