"""The math reward on real answer strings, including through verl's own custom-reward loader."""

from __future__ import annotations

import threading

import pytest

from m2po.reward import compute_score, last_boxed

CASES = [
    # (response, ground truth, correct?)
    (r"so the answer is \boxed{\frac{1}{2}}", "1/2", True),
    (r"\boxed{0.5}", r"\frac12", True),
    (r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{2}}", r"\sqrt{3}", False),
    (r"\boxed{(0, 1]}", r"(0,1]", True),
    (r"\boxed{[0, 1)}", r"(0,1]", False),
    (r"\boxed{10\text{ cm}}", "10", True),
    (r"\boxed{12}", "13", False),
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{3, 5}", r"5,3", True),
    (r"first \boxed{4} then corrected: \boxed{6}", "6", True),
    (r"first \boxed{6} then corrected: \boxed{4}", "6", False),
    (r"The answer is 6.", "6", None),  # no box: not extractable
    (r"\boxed{\frac{1}{2}", "1/2", None),  # unbalanced braces
    (r"\boxed{}", "1", None),
    (r"\boxed{\frac{a}{b}}", r"\frac{a}{b}", True),
    (r"\boxed{\pi}", r"\pi", True),
    (r"\boxed{\frac{\pi}{2}}", "1.5708", False),
]


@pytest.mark.parametrize("response, truth, correct", CASES)
def test_reward_table(response, truth, correct):
    plain = compute_score("math", response, truth)
    with_format = compute_score("math", response, truth, format_reward=0.1)
    if correct is None:
        assert plain["score"] == with_format["score"] == 0.0 and plain["extracted"] == ""
    elif correct:
        assert plain["score"] == with_format["score"] == 1.0 and plain["acc"] == 1.0
    else:
        assert plain["score"] == 0.0 and with_format["score"] == 0.1 and plain["acc"] == 0.0


def test_last_boxed_handles_nesting_and_fbox():
    assert last_boxed(r"\boxed{\frac{1}{\sqrt{2}}} and more") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no answer") is None


def test_works_off_the_main_thread_like_verls_executor():
    results = []
    thread = threading.Thread(target=lambda: results.append(compute_score("math", r"\boxed{\frac{2}{4}}", "1/2")))
    thread.start()
    thread.join(60)
    assert results and results[0]["score"] == 1.0


def test_bad_format_reward():
    with pytest.raises(ValueError, match="format_reward"):
        compute_score("math", r"\boxed{1}", "1", format_reward=1.5)


def test_loaded_through_verls_custom_reward_keys():
    from omegaconf import OmegaConf
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": "pkg://m2po.reward.math_reward", "name": "compute_score", "reward_kwargs": {"format_reward": 0.1}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="math", solution_str=r"\boxed{7}", ground_truth="8", extra_info=None)["score"] == 0.1
    assert fn(data_source="math", solution_str=r"\boxed{8}", ground_truth="8", extra_info=None)["score"] == 1.0
