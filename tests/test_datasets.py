"""The dataset preprocessors on small fixture files in tests/fixtures/datasets, through the same
code as the hub downloads (everything after reading the rows), and the reward on their answers."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from m2po.data import DATASETS, PROMPT_TEMPLATE, preprocess
from m2po.data.math_datasets import DatasetSpec, normalise_answer, to_verl_rows
from m2po.reward.math_reward import compute_score

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "datasets")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ground truths as the parquet must hold them (math-verify-parsable, no `$`, first of lists).
EXPECTED_ANSWERS = {
    "deepscaler": ["1023", "8\\sqrt{2}", "(2,3)"],
    "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)", "26000", "\\frac{2}{3}"],
    "aime24": ["204", "025"],
    "aime25": ["70", "16"],
    "amc23": ["27", "36"],
    "amc24": ["2", "246"],
    "minerva": ["1.6", "+2"],
    "gaokao2023en": ["\\{-2\\}", "-i"],
    "olympiadbench": ["3", "7"],
}


def _fixture(name: str) -> str:
    return os.path.join(FIXTURES, f"{name.removesuffix('x4')}.jsonl")


def test_every_dataset_has_a_fixture_and_expected_answers():
    assert {name.removesuffix("x4") for name in DATASETS} == set(EXPECTED_ANSWERS)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_preprocessor_writes_verl_rows(tmp_path, name):
    spec = DATASETS[name]
    path = preprocess(name, str(tmp_path), source=_fixture(name))
    assert path == os.path.join(tmp_path, name, f"{spec.output_split}.parquet")
    frame = pd.read_parquet(path)
    expected = EXPECTED_ANSWERS[name.removesuffix("x4")] * spec.repeat
    assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(frame) == len(expected)
    assert [row["ground_truth"] for row in frame["reward_model"]] == expected
    assert set(frame["data_source"]) == {name} and set(frame["ability"]) == {"math"}
    assert [info["index"] for info in frame["extra_info"]] == list(range(len(expected)))
    first_prompt = list(frame["prompt"].iloc[0])
    assert len(first_prompt) == 1 and first_prompt[0]["role"] == "user"
    content = first_prompt[0]["content"]
    assert content.startswith("Please solve the following math problem: ") and "\\boxed{} tags" in content
    # a response boxing the ground truth earns the full reward: answers are math-verify-parsable
    for answer in expected:
        assert compute_score(name, f"So the answer is \\boxed{{{answer}}}.", answer)["score"] == 1.0, answer


def test_aime_x4_repeats_each_problem_four_times_in_order(tmp_path):
    frame = pd.read_parquet(preprocess("aime24x4", str(tmp_path), source=_fixture("aime24")))
    sources = [info["source_index"] for info in frame["extra_info"]]
    assert sources == [0, 1] * 4


def test_template_is_the_authors():
    rows = to_verl_rows(DatasetSpec("t", "hub/t", "test", "test"), [{"problem": "1+1?", "answer": "2"}])
    assert rows[0]["prompt"][0]["content"] == PROMPT_TEMPLATE.format(problem="1+1?")
    assert "\\boxed{} tags, for example \\boxed{1}" in PROMPT_TEMPLATE.format(problem="x")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(["$5$", "$6$"], "5"), (27.0, "27"), (2.5, "2.5"), ("  $\\frac{1}{2}$ ", "\\frac{1}{2}"), (12, "12")],
)
def test_answer_normalisation(raw, expected):
    assert normalise_answer(raw) == expected


def test_bad_input_is_refused_with_the_reason(tmp_path):
    spec = DATASETS["math500"]
    with pytest.raises(KeyError, match=r"no answer column .* the rows have \['problem', 'solution'\]"):
        to_verl_rows(spec, [{"problem": "p", "solution": "s"}])
    with pytest.raises(ValueError, match="math500 row 0: empty answer"):
        to_verl_rows(spec, [{"problem": "p", "answer": " $ "}])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess("math500", str(tmp_path), source=str(tmp_path / "missing.jsonl"))
    with pytest.raises(KeyError, match="unknown dataset 'math501'"):
        preprocess("math501", str(tmp_path))


def test_generate_datasets_script_with_local_sources(tmp_path):
    sources = [f"{name}={_fixture(name)}" for name in sorted(DATASETS)]
    result = subprocess.run(
        ["bash", os.path.join(REPO, "train-scripts", "generate_datasets.sh"), "--source", *sources],
        env={**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(tmp_path / "data")},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "data")
                     for d, _, files in os.walk(tmp_path / "data") for f in files)
    assert written == sorted(f"{n}/{DATASETS[n].output_split}.parquet" for n in DATASETS)
