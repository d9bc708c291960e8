#!/usr/bin/env bash
# Write the paper's train and eval sets as verl parquet files under data/ (or $DATA_DIR):
#   train: data/deepscaler/train.parquet
#   eval:  data/{math500,aime24,aime24x4,aime25,aime25x4,amc23,amc24,minerva,gaokao2023en,olympiadbench}/test.parquet
# Downloads from the Hugging Face hub; give local copies with --source NAME=FILE (.jsonl/.json/.parquet).
#
#   bash train-scripts/generate_datasets.sh [--only math500 aime24] [--source gaokao2023en=raw/gaokao.jsonl]
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m m2po.data --out "${DATA_DIR:-data}" "$@"
