"""M2PO's cut over a whole mini-batch (m2po.algorithm.minibatch_mask): split into micro-batches in any
way, and across two gloo ranks, it equals the one-tensor cut on the concatenation, token for token, and
the literal Algorithm 1."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from m2po.algorithm import second_moment_clip_bound, second_moment_keep_mask
from m2po.algorithm.minibatch_mask import minibatch_clip_bound, minibatch_keep_masks
from tests.reference import algorithm1_keep_mask


def _batch(seed: int, tokens: int, scale: float = 0.3, ties: bool = False):
    generator = torch.Generator().manual_seed(seed)
    log_ratio = torch.randn(tokens, generator=generator) * scale
    if ties:  # few distinct values: the tie rule decides
        log_ratio = (log_ratio * 4).round() / 4
    candidates = torch.rand(tokens, generator=generator) < 0.6
    return log_ratio, candidates


def _split(tensor: torch.Tensor, sizes: list[int], widths: list[int]) -> list[torch.Tensor]:
    """Consecutive pieces of a flat tensor, each reshaped to (rows, width) like padded micro-batches."""
    parts, start = [], 0
    for size, width in zip(sizes, widths):
        parts.append(tensor[start : start + size].reshape(size // width, width))
        start += size
    return parts


@st.composite
def split_batches(draw):
    widths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    sizes = [w * draw(st.integers(1, 8)) for w in widths]
    seed = draw(st.integers(0, 2**31 - 1))
    log_ratio, candidates = _batch(seed, sum(sizes), scale=draw(st.sampled_from([0.05, 0.3, 1.5])),
                                   ties=draw(st.booleans()))
    return log_ratio, candidates, sizes, widths


@settings(max_examples=150, deadline=None)
@given(split_batches(), st.sampled_from([1e-3, 0.04, 0.5]))
def test_any_micro_batching_gives_the_mask_and_cap_of_the_concatenated_batch(batch, tau):
    log_ratio, candidates, sizes, widths = batch
    keep = minibatch_keep_masks(_split(log_ratio, sizes, widths), _split(candidates, sizes, widths), tau)
    assert [k.shape for k in keep] == [p.shape for p in _split(log_ratio, sizes, widths)]
    flat = torch.cat([k.reshape(-1) for k in keep])
    assert torch.equal(flat, second_moment_keep_mask(log_ratio, candidates, tau))
    assert torch.equal(flat, algorithm1_keep_mask(log_ratio, candidates, tau))
    cap = minibatch_clip_bound(_split(log_ratio, sizes, widths), _split(candidates, sizes, widths), tau)
    expected = second_moment_clip_bound(log_ratio, candidates, tau)
    assert (math.isinf(cap) and math.isinf(expected)) or float(cap) == pytest.approx(float(expected), rel=1e-12)


def test_per_micro_batch_cuts_differ_from_the_mini_batch_cut():
    """Why the scope matters: the same tokens, cut per micro-batch, are masked differently."""
    log_ratio, candidates = _batch(7, 4096)
    log_ratio[:512] *= 4  # one micro-batch far more off-policy than the rest
    whole = torch.cat([k.reshape(-1) for k in minibatch_keep_masks([log_ratio], [candidates], 0.04)])
    per_micro = torch.cat([second_moment_keep_mask(d, c, 0.04) for d, c in zip(log_ratio.split(512), candidates.split(512))])
    assert not torch.equal(whole, per_micro)


def test_bad_input_is_refused_by_what_is_wrong():
    d, c = _batch(0, 12)
    with pytest.raises(ValueError, match="non-empty sequence of tensors"):
        minibatch_keep_masks(d, c, 0.04)
    with pytest.raises(ValueError, match="2 log-ratio tensors but 1 candidate masks"):
        minibatch_keep_masks([d, d], [c], 0.04)
    with pytest.raises(ValueError, match=r"micro-batch 0: log_ratio \(12,\) and candidates \(6, 2\) differ"):
        minibatch_keep_masks([d], [c.reshape(6, 2)], 0.04)
    with pytest.raises(ValueError, match="must be bool"):
        minibatch_keep_masks([d], [c.float()], 0.04)
    with pytest.raises(ValueError, match="must be > 0"):
        minibatch_clip_bound([d], [c], 0.0)
    assert all(k.all() for k in minibatch_keep_masks([d], [c], math.inf))


# ---------------------------------------------------------------------- two data-parallel ranks (gloo)

# Global order: rank 0's micro-batches, then rank 1's; each rank's share split differently.
RANK_SIZES = {0: ([40, 24, 64], [4, 3, 8]), 1: ([96, 30], [6, 5])}
CASES = [(seed, tau, ties) for seed in (1, 2, 3) for tau in (1e-3, 0.04, 0.5) for ties in (False, True)]


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        start = sum(RANK_SIZES[0][0]) if rank == 1 else 0
        sizes, widths = RANK_SIZES[rank]
        results = {}
        for seed, tau, ties in CASES:
            log_ratio, candidates = _batch(seed, sum(RANK_SIZES[0][0]) + sum(RANK_SIZES[1][0]), ties=ties)
            mine = slice(start, start + sum(sizes))
            d, c = _split(log_ratio[mine], sizes, widths), _split(candidates[mine], sizes, widths)
            keep = minibatch_keep_masks(d, c, tau, group=dist.group.WORLD)
            results[(seed, tau, ties)] = (torch.cat([k.reshape(-1) for k in keep]),
                                          minibatch_clip_bound(d, c, tau, group=dist.group.WORLD))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_take_the_cut_of_the_concatenated_mini_batch(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    total = sum(RANK_SIZES[0][0]) + sum(RANK_SIZES[1][0])
    any_masked = 0
    for seed, tau, ties in CASES:
        log_ratio, candidates = _batch(seed, total, ties=ties)
        expected = second_moment_keep_mask(log_ratio, candidates, tau)
        got = torch.cat([ranks[0][(seed, tau, ties)][0], ranks[1][(seed, tau, ties)][0]])
        assert torch.equal(got, expected), (seed, tau, ties)
        assert torch.equal(got, algorithm1_keep_mask(log_ratio, candidates, tau))
        any_masked += int((~got).sum())
        cap = second_moment_clip_bound(log_ratio, candidates, tau)
        for r in (0, 1):  # every rank holds the same cap
            got_cap = ranks[r][(seed, tau, ties)][1]
            assert (math.isinf(cap) and math.isinf(got_cap)) or float(got_cap) == pytest.approx(float(cap), rel=1e-12)
    assert any_masked > 0  # the cases do exercise the cut


def test_the_scope_benchmark_counts_what_it_says():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_mask_scope.py")
    spec = importlib.util.spec_from_file_location("bench_mask_scope", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # two one-row micro-batches: the first far off-policy, the second calm (candidates within the valid tokens)
    log_ratio = torch.tensor([[0.5, 0.1, 0.0], [0.1, 0.1, 0.1]])
    trust_region = torch.tensor([[True, True, False], [True, True, False]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = bench.compare_scopes(log_ratio, trust_region, valid, tau=0.04, sequences=1)
    # mini-batch: (0.25 + 3 x 0.01) / 4 > tau, without 0.25 the mean is 0.01: only (0, 0) masked. Per
    # micro-batch: row 0 (0.25, 0.01) masks (0, 0), row 1 nothing. The same mask, 1 of 5 valid tokens.
    assert out["differ"] == 0.0 and out["masked_micro"] == out["masked_minibatch"] == pytest.approx(1 / 5)
    assert out["m2_after_micro_max"] == pytest.approx(0.01)
    # tau 0.006 and a calmer row 1 (0.0025 each): per micro-batch, row 0 keeps neither 0.25 nor 0.01 (2
    # masked), row 1 keeps both; over the mini-batch, without 0.25 the mean is (0.01 + 2 x 0.0025) / 3 =
    # 0.005 <= tau (1 masked). The scopes differ on token (0, 1).
    log_ratio[1] = torch.tensor([0.05, 0.05, 0.05])
    out = bench.compare_scopes(log_ratio, trust_region, valid, tau=0.006, sequences=1)
    assert out["masked_micro"] == pytest.approx(2 / 5) and out["masked_minibatch"] == pytest.approx(1 / 5)
    assert out["differ"] == pytest.approx(1 / 5)
