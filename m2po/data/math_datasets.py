"""Preprocessors for the paper's train and eval sets: rows -> verl RL parquet.

Each dataset is a `DatasetSpec`: where it comes from (a Hugging Face dataset id and split by
default, or a local .jsonl/.json/.parquet file given with `source=`), which column holds the
problem and which the answer, and how many times eval rows are repeated (AIME x4 gives avg@16
with 4 samples per prompt, as in the paper). Every row becomes verl's RL format:

    data_source   the dataset name (verl groups validation metrics by it)
    prompt        [{"role": "user", "content": PROMPT_TEMPLATE.format(problem=...)}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": <answer>}
    extra_info    {"split", "index", "source_index"}

The hub path and the local-file path share everything after reading the rows, which is what
the fixture tests exercise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

# The instruction of the authors' released preprocessing (all train and eval sets).
PROMPT_TEMPLATE = (
    "Please solve the following math problem: {problem}. The assistant first thinks about the reasoning "
    "process step by step and then provides the user with the answer. Return the final answer in \\boxed{{}} "
    "tags, for example \\boxed{{1}}. Let's solve this step by step. "
)

PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question")
ANSWER_COLUMNS = ("answer", "final_answer", "Answer", "ground_truth")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hub_id: str
    split: str  # the hub split to read
    output_split: str  # output file name: train.parquet or test.parquet
    repeat: int = 1

    def __post_init__(self):
        if self.repeat < 1:
            raise ValueError(f"{self.name}: repeat must be >= 1, got {self.repeat}")
        if self.output_split not in ("train", "test"):
            raise ValueError(f"{self.name}: output_split must be train or test, got {self.output_split!r}")


def _spec(name, hub_id, split="test", output_split="test", repeat=1):
    return DatasetSpec(name=name, hub_id=hub_id, split=split, output_split=output_split, repeat=repeat)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _spec("deepscaler", "agentica-org/DeepScaleR-Preview-Dataset", split="train", output_split="train"),
        _spec("math500", "HuggingFaceH4/MATH-500"),
        _spec("aime24", "HuggingFaceH4/aime_2024", split="train"),
        _spec("aime24x4", "HuggingFaceH4/aime_2024", split="train", repeat=4),
        _spec("aime25", "math-ai/aime25"),
        _spec("aime25x4", "math-ai/aime25", repeat=4),
        _spec("amc23", "math-ai/amc23"),
        _spec("amc24", "math-ai/amc24"),
        _spec("minerva", "math-ai/minervamath"),
        _spec("gaokao2023en", "MARIO-Math-Reasoning/Gaokao2023-Math-En"),
        _spec("olympiadbench", "math-ai/olympiadbench"),
    )
}


# The eight evaluation sets of the paper, in its Table 1 order, by data source (verl groups validation
# metrics by it): AIME repeated 4x with 4 samples each is avg@16, the others avg@4.
PAPER_BENCHMARKS = (
    "math500", "aime24x4", "aime25x4", "amc23", "amc24", "minerva", "gaokao2023en", "olympiadbench",
)


def _pick(row: dict, columns: tuple[str, ...], what: str, dataset: str):
    for column in columns:
        if column in row and row[column] is not None:
            return row[column]
    raise KeyError(f"{dataset}: no {what} column among {list(columns)}; the rows have {sorted(row)}")


def normalise_answer(answer) -> str:
    """Ground truth as a string math-verify parses: first of a list (OlympiadBench), no `$`."""
    if isinstance(answer, (list, tuple)):
        if not answer:
            raise ValueError("empty answer list")
        answer = answer[0]
    if hasattr(answer, "tolist"):  # numpy array / scalar from parquet
        answer = answer.tolist()
        if isinstance(answer, list):
            return normalise_answer(answer)
    if isinstance(answer, float) and answer.is_integer():  # AMC23 stores 27.0
        answer = int(answer)
    text = str(answer).strip().replace("$", "").strip()
    if not text:
        raise ValueError("empty answer")
    return text


def to_verl_rows(spec: DatasetSpec, rows: list[dict]) -> list[dict]:
    """verl RL rows for `rows` (each with a problem and an answer column), repeated `spec.repeat` times."""
    if not rows:
        raise ValueError(f"{spec.name}: no rows")
    converted = []
    for source_index, row in enumerate(rows):
        problem = str(_pick(row, PROBLEM_COLUMNS, "problem", spec.name)).strip()
        try:
            answer = normalise_answer(_pick(row, ANSWER_COLUMNS, "answer", spec.name))
        except ValueError as error:
            raise ValueError(f"{spec.name} row {source_index}: {error}") from None
        converted.append(
            {
                "data_source": spec.name,
                "prompt": [{"role": "user", "content": PROMPT_TEMPLATE.format(problem=problem)}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": answer},
                "extra_info": {"split": spec.output_split, "source_index": source_index},
            }
        )
    repeated = [dict(row) for _ in range(spec.repeat) for row in converted]
    for index, row in enumerate(repeated):
        row["extra_info"] = {**row["extra_info"], "index": index}
    return repeated


def read_rows(spec: DatasetSpec, source: str | None = None) -> list[dict]:
    """Rows from a local file (.jsonl, .json, .parquet) or, by default, from the hub."""
    if source is None:
        import datasets  # only on machines that download

        return [dict(row) for row in datasets.load_dataset(spec.hub_id, split=spec.split)]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{spec.name}: source file {source} does not exist")
    if source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if source.endswith(".json"):
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, list) else data[spec.split]
    if source.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(source).to_dict(orient="records")
    raise ValueError(f"{spec.name}: source must be a .jsonl, .json or .parquet file, got {source}")


def preprocess(name: str, out_dir: str, source: str | None = None) -> str:
    """Write `<out_dir>/<name>/<train|test>.parquet` atomically; returns its path."""
    import pandas as pd

    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    spec = DATASETS[name]
    rows = to_verl_rows(spec, read_rows(spec, source))
    directory = os.path.join(out_dir, name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{spec.output_split}.parquet")
    tmp_path = path + ".tmp"
    pd.DataFrame(rows).to_parquet(tmp_path, index=False)
    os.replace(tmp_path, path)
    return path
