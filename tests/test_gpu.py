"""CUDA gives the same masks, bounds, losses and gradients as the CPU. Skipped without a GPU
(see conftest.py); run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from m2po.algorithm import m2po_token_losses, second_moment_clip_bound, second_moment_keep_mask, trust_region_mask
from tests.reference import algorithm1_keep_mask
from tests.test_masking_reference import _batch

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["light", "heavy", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_and_algorithm1(kind, dtype):
    log_ratio, advantages, response_mask = _batch(kind, 0, batch=64, length=256)
    log_ratio = log_ratio.to(dtype)
    candidates = trust_region_mask(log_ratio, advantages, response_mask)
    keep_cpu = second_moment_keep_mask(log_ratio, candidates, 0.04)
    keep_gpu = second_moment_keep_mask(log_ratio.cuda(), candidates.cuda(), 0.04)
    assert torch.equal(keep_gpu.cpu(), keep_cpu)
    assert torch.equal(keep_cpu, algorithm1_keep_mask(log_ratio, candidates, 0.04))
    cap_cpu = second_moment_clip_bound(log_ratio, candidates, 0.04)
    cap_gpu = second_moment_clip_bound(log_ratio.cuda(), candidates.cuda(), 0.04)
    torch.testing.assert_close(cap_gpu.cpu(), cap_cpu, rtol=1e-12, atol=0)


@pytest.mark.parametrize("variant", ["mask", "clip"])
def test_cuda_loss_and_gradient_match_cpu(variant):
    log_ratio, advantages, response_mask = _batch("heavy", 1, batch=32, length=512)
    behaviour = -torch.rand(log_ratio.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for device in ("cpu", "cuda"):
        lp = (behaviour + log_ratio).to(device).requires_grad_()
        out = m2po_token_losses(lp, behaviour.to(device), advantages.to(device), response_mask.to(device), 0.04, variant)
        out.token_losses.sum().backward()
        results.append((out.token_losses.detach().cpu(), lp.grad.cpu(), out.keep_mask.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[1][2], results[0][2])
