"""The CPU rollout's sampler: batched, KV-cached decoding of many requests at once (no verl import).

Each request draws from its own generator, seeded by `request_seed` (rollout seed, training step of
the weights, prompt, repeat index), so the tokens a request gets do not depend on which other
requests share its batch (tested against one-at-a-time sampling). A `stop` event ends decoding
before the next token, for verl's partial rollout (`rollout.HFSamplingServer.abort_all_requests`).

Why not the testbed's sampler (`m2po.testbed.model.sample`): that one samples a whole batch from one
generator under the testbed's digits-only logit mask; this one must be batching-invariant, honour
verl's per-request sampling parameters (temperature, top-k, top-p, length) and stop mid-decode.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class SampleRequest:
    """One generate call: prompt, budget, sampling parameters, its seed, and the server's future."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    want_log_probs: bool
    seed: int
    future: asyncio.Future = field(repr=False, default=None)


def request_seed(base_seed: int, weights_step, prompt_ids: list[int], occurrence: int) -> int:
    """A 63-bit seed from everything that identifies a request's draw."""
    digest = hashlib.sha256(f"{base_seed}|{weights_step}|{occurrence}|{prompt_ids}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`logits` (vocab,) with everything outside top-k / top-p set to -inf."""
    if top_k is not None and 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample_batch(
    model,
    requests: list[SampleRequest],
    eos_token_ids: set[int],
    pad_token_id: int,
    stop: Optional[threading.Event] = None,
):
    """Sample every request in one batched decode. Returns [(token_ids, log_probs, aborted)] per request.

    Prompts are left-padded; each row stops at its own EOS or `max_tokens`. The log-prob of a
    sampled token is taken from `log_softmax(logits / temperature)` (greedy: temperature 1), the
    distribution verl's actor recomputes. When `stop` is set, decoding ends before the next token and
    the unfinished rows come back with what they have and `aborted=True`.
    """
    from transformers import DynamicCache

    batch = len(requests)
    prompt_len = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prompt_len), dtype=torch.long)
    for row, request in enumerate(requests):
        input_ids[row, prompt_len - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
        attention_mask[row, prompt_len - len(request.prompt_ids) :] = 1
    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    budgets = [r.max_tokens for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    log_probs: list[list[float]] = [[] for _ in requests]
    finished = [False] * batch
    aborted = [False] * batch
    cache = DynamicCache()
    step_ids = input_ids
    for _ in range(max(budgets)):
        if stop is not None and stop.is_set():
            aborted = [not done for done in finished]
            break
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1] :]
        logits = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :].float()
        next_ids = torch.full((batch,), pad_token_id, dtype=torch.long)
        for row, request in enumerate(requests):
            if finished[row]:
                continue
            row_logits = logits[row]
            if request.temperature > 0:
                scaled = row_logits / request.temperature
                filtered = _filter_logits(scaled, request.top_k, request.top_p)
                uniform = torch.rand(filtered.shape, generator=generators[row]).clamp_(1e-12, 1 - 1e-12)
                token = int(torch.argmax(filtered - torch.log(-torch.log(uniform))))
            else:
                scaled = row_logits
                token = int(torch.argmax(scaled))
            next_ids[row] = token
            outputs[row].append(token)
            if request.want_log_probs:
                log_probs[row].append(float(torch.log_softmax(scaled, dim=-1)[token]))
            if token in eos_token_ids or len(outputs[row]) >= budgets[row]:
                finished[row] = True
        if all(finished):
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
    return [
        (outputs[row], log_probs[row] if requests[row].want_log_probs else None, aborted[row]) for row in range(batch)
    ]
