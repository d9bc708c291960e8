"""Hand-built micro-batches in the layout verl's `ppo_loss` receives from the FSDP engine."""

from __future__ import annotations

import torch
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu


def micro_batch(log_probs, old_log_probs, advantages, response_mask, prompt_lens, *, batch_num_tokens,
                global_batch_size, dp_size=1, rollout_is_weights=None):
    """(model_output, data) for `verl.workers.utils.losses.ppo_loss`.

    `log_probs` `(batch, response_len)` is laid out like the engine's unpadded model output: all
    sequences (prompt + response) concatenated, shifted left by one token. Returns the flat
    tensor too, whose gradient at the response positions is the gradient w.r.t. `log_probs`.
    """
    batch, response_len = log_probs.shape
    max_prompt = max(prompt_lens)
    response_lens = response_mask.sum(dim=1).tolist()
    pieces, attention = [], []
    for i in range(batch):
        p, r = prompt_lens[i], response_lens[i]
        seq = torch.zeros(p + r, dtype=log_probs.dtype)
        seq[p - 1 : p - 1 + r] = log_probs[i, :r]
        pieces.append(seq)
        attention.append(
            torch.cat([torch.zeros(max_prompt - p), torch.ones(p), torch.ones(r), torch.zeros(response_len - r)])
        )
    flat = torch.cat(pieces).requires_grad_()
    tensors = {
        "prompts": torch.ones(batch, max_prompt, dtype=torch.long),
        "responses": torch.ones(batch, response_len, dtype=torch.long),
        "attention_mask": torch.stack(attention).long(),
        "response_mask": response_mask.long(),
        "old_log_probs": old_log_probs,
        "advantages": advantages,
    }
    if rollout_is_weights is not None:
        tensors["rollout_is_weights"] = rollout_is_weights
    data = TensorDict(tensors, batch_size=[batch])
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    return {"log_probs": flat}, data, flat


def response_grad(flat_grad, response_mask, prompt_lens):
    """Gather the gradient of the flat model output back to `(batch, response_len)`."""
    out = torch.zeros(response_mask.shape, dtype=flat_grad.dtype)
    offset = 0
    for i, r in enumerate(response_mask.sum(dim=1).tolist()):
        p = prompt_lens[i]
        out[i, :r] = flat_grad[offset + p - 1 : offset + p - 1 + r]
        offset += p + r
    return out
