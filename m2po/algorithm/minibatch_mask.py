"""M2PO's cut over a whole optimizer mini-batch: every micro-batch, every data-parallel rank.

verl calls a policy loss once per micro-batch on each rank, so `second_moment_keep_mask` sees one
micro-batch. The paper's Algorithm 1 takes the cut over the batch being trained. The functions here
take it over several micro-batches at once (one rank's share of a mini-batch, e.g. from a forward
without gradient at the current weights) and, given a `torch.distributed` process group, over every
rank's share together, and hand each micro-batch its slice.

Exactness: the result is `second_moment_keep_mask` (resp. `second_moment_clip_bound`) applied to the
concatenation of every rank's flattened micro-batches, ranks in order, micro-batches in the order given,
with its tie rule on that global order (among equal `d**2` the larger global index is dropped first).

Communication: the sums and counts of the candidates with `d**2 <= tau` (never masked, never capped) are
all-reduced; only the candidates above tau, usually a few percent of the tokens, are gathered, with
their global positions. Every rank then takes the same decision from the same numbers. Plain PyTorch
(no verl import); works with any backend that has `all_reduce` and `all_gather` (gloo, NCCL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from m2po.algorithm.masking import check_m2_threshold

__all__ = ["minibatch_keep_masks", "minibatch_clip_bound"]


@dataclass
class _AboveTau:
    """What the decision needs, the same on every rank.

    low_sum / low_count: float64 sum of `d**2` and count over every rank's candidates with `d**2 <= tau`.
    moment / global_index: `d**2` (float64) and global flat position of every rank's candidates above tau.
    offset / numel: where this rank's tokens start in the global order, and how many it has.
    """

    low_sum: torch.Tensor
    low_count: torch.Tensor
    moment: torch.Tensor
    global_index: torch.Tensor
    offset: int
    numel: int


def _flatten(tensors: Sequence[torch.Tensor], what: str) -> torch.Tensor:
    if isinstance(tensors, torch.Tensor) or not len(tensors):
        raise ValueError(f"{what} must be a non-empty sequence of tensors (one per micro-batch)")
    return torch.cat([t.reshape(-1) for t in tensors])


def _check_pairs(log_ratios, candidates) -> None:
    if len(log_ratios) != len(candidates):
        raise ValueError(f"{len(log_ratios)} log-ratio tensors but {len(candidates)} candidate masks")
    for k, (d, c) in enumerate(zip(log_ratios, candidates)):
        if d.shape != c.shape:
            raise ValueError(f"micro-batch {k}: log_ratio {tuple(d.shape)} and candidates {tuple(c.shape)} differ")
        if c.dtype != torch.bool:
            raise ValueError(f"micro-batch {k}: candidates must be bool, got {c.dtype}")


def _world(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _gather_variable(values: torch.Tensor, world_size: int, group) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order."""
    import torch.distributed as dist

    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.empty_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros(max(sizes), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _above_tau(log_ratios, candidates, tau: float, group) -> _AboveTau:
    _check_pairs(log_ratios, candidates)
    abs_log_ratio = _flatten(log_ratios, "log_ratios").detach().abs().double()
    flat_candidates = _flatten(candidates, "candidates")
    moment = abs_log_ratio.square()  # float64 squares of float32 / bf16 values are exact
    above = flat_candidates & (moment > tau)
    low = flat_candidates & ~above
    low_sum = torch.where(low, moment, 0.0).sum()
    low_count = low.sum().double()
    local_index = above.nonzero().squeeze(1)
    rank, world_size = _world(group)
    if world_size == 1:
        return _AboveTau(low_sum, low_count, moment[local_index], local_index, 0, moment.numel())
    import torch.distributed as dist

    totals = torch.stack([low_sum, low_count])
    dist.all_reduce(totals, group=group)
    numel = torch.tensor([moment.numel()], dtype=torch.long, device=moment.device)
    numels = [torch.empty_like(numel) for _ in range(world_size)]
    dist.all_gather(numels, numel, group=group)
    offset = int(sum(int(n) for n in numels[:rank]))
    return _AboveTau(totals[0], totals[1], _gather_variable(moment[local_index], world_size, group),
                     _gather_variable(local_index + offset, world_size, group), offset, moment.numel())


def _ascending(above: _AboveTau) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates above tau in ascending `d**2`, equal values by ascending global index."""
    by_index = torch.argsort(above.global_index)
    order = by_index[torch.argsort(above.moment[by_index], stable=True)]
    return above.moment[order], above.global_index[order]


def minibatch_keep_masks(
    log_ratios: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    m2_threshold: float,
    group=None,
) -> list[torch.Tensor]:
    """Algorithm 1's keep-mask over every micro-batch given (and, with `group`, every rank's).

    Args:
        log_ratios: one `(batch_k, response_len_k)` tensor per micro-batch, `log pi_theta - log pi_behav`;
            not differentiated.
        candidates: bool tensors of the same shapes, the tokens that may be masked (the trust region).
        m2_threshold: tau > 0; `math.inf` keeps everything.
        group: a `torch.distributed` process group whose ranks decide one cut together (every rank must
            call with its own micro-batches); None: this process's micro-batches only.

    Returns:
        One bool keep-mask per micro-batch, False exactly on the masked tokens.
    """
    tau = check_m2_threshold(m2_threshold)
    shapes = [t.shape for t in log_ratios]
    above = _above_tau(log_ratios, candidates, tau, group)
    keep = torch.ones(above.numel, dtype=torch.bool, device=above.moment.device)
    if not math.isinf(tau) and above.moment.numel():
        moment, global_index = _ascending(above)
        kept = torch.arange(1, moment.numel() + 1, device=moment.device)
        mean_if_kept = (above.low_sum + torch.cumsum(moment, dim=0)) / (above.low_count + kept)
        num_kept = int((kept * (mean_if_kept <= tau)).max())
        dropped = global_index[num_kept:] - above.offset
        keep[dropped[(dropped >= 0) & (dropped < above.numel)]] = False
    return [part.reshape(shape) for part, shape in zip(keep.split([math.prod(s) for s in shapes]), shapes)]


def minibatch_clip_bound(
    log_ratios: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor],
    m2_threshold: float,
    group=None,
) -> torch.Tensor:
    """The authors' clip bound (`second_moment_clip_bound`) over every micro-batch given (and, with
    `group`, every rank's): the cap on `|log r|` whose capped second moment over all the candidates is
    tau; 0-dim float64, `inf` when nothing needs capping. Arguments as `minibatch_keep_masks`."""
    tau = check_m2_threshold(m2_threshold)
    above = _above_tau(log_ratios, candidates, tau, group)
    no_cap = torch.tensor(math.inf, dtype=torch.float64, device=above.moment.device)
    num_above = above.moment.numel()
    if math.isinf(tau) or num_above == 0:
        return no_cap  # every candidate is <= tau, and so is their mean
    moment, _ = _ascending(above)
    num_candidates = above.low_count + num_above
    rank = torch.arange(num_above, device=moment.device)
    # n * mean(min(m, m_(j))): every candidate below m_(j) in full, m_(j) for it and all above it.
    capped_total = above.low_sum + torch.cumsum(moment, dim=0) - moment + moment * (num_above - rank)
    num_fully_below = int((capped_total <= tau * num_candidates).sum())
    if num_fully_below == num_above:
        return no_cap  # the uncapped mean is already <= tau
    sum_fully_below = above.low_sum + moment[:num_fully_below].sum()
    cap_squared = (tau * num_candidates - sum_fully_below) / (num_above - num_fully_below)
    return cap_squared.clamp(min=0).sqrt()
