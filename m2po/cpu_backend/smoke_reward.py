"""Reward of the tiny CPU task: 1.0 when the answer's digits appear in the response, else 0.0.

Deliberately lenient so that a random tiny model gets non-zero rewards with variance inside each
group (a 0/1 exact-match reward would give it all zeros and a zero policy gradient).
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **_kwargs) -> float:
    return 1.0 if str(ground_truth) in solution_str else 0.0
