"""A tiny Llama-architecture policy and its tokenizer, built offline, plus sampling and log-probs.

The policy is the language model itself: a softmax over the whole vocabulary, as verl's actor and
rollout compute it, so the same weights define the same policy in the testbed's loop and in verl's
trainer (`m2po.testbed.verl_engine`). The artifacts are ordinary `save_pretrained` folders (config +
safetensors weights, and a `tokenizers` tokenizer with a chat template that renders a prompt as
`<s>` + its text), so the same files load in transformers, verl or vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from m2po.testbed.task import BOS, BOS_ID, EOS, EOS_ID, PAD, PAD_ID, SYMBOLS
from m2po.utils.tiny_llama import char_level_tokenizer, tiny_llama


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be a multiple of model.num_heads ({self.num_heads})"
            )


# verl renders a prompt's chat messages with the tokenizer's chat template: here `<s>` + the text,
# exactly the testbed's prompt (`m2po.testbed.task.AdditionTask.encode_prompts`).
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over the task's symbols; PAD, BOS and EOS are matched whole."""
    tokenizer = char_level_tokenizer(SYMBOLS, unk_token=PAD, special_tokens=(PAD, BOS, EOS), bos_token=BOS,
                                     eos_token=EOS, pad_token=PAD)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(config: ModelConfig, seed: int) -> LlamaForCausalLM:
    model = tiny_llama(
        seed,
        vocab_size=len(SYMBOLS),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=64,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    model.config._attn_implementation = "sdpa"
    return model


def save_pretrained(model: LlamaForCausalLM, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer().save_pretrained(directory)


def load_pretrained(directory: str) -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(directory, local_files_only=True)
    model.config._attn_implementation = "sdpa"
    return model


def response_log_probs(model, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """log pi(response_t | prompt, response_<t) for every response position, `(batch, response_len)`.

    The softmax over the whole vocabulary, as `sample` draws from and verl's actor recomputes;
    positions after EOS hold garbage and must be masked by the caller.
    """
    input_ids = torch.cat([prompts, responses], dim=1)
    logits = model(input_ids=input_ids).logits[:, prompts.shape[1] - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(model, prompts: torch.Tensor, response_len: int, generator: torch.Generator, temperature: float = 1.0):
    """Autoregressive sampling; returns `(responses, response_mask)`, EOS included in the mask,
    PAD after it. A response without EOS in `response_len` tokens is unterminated (reward 0)."""
    batch = prompts.shape[0]
    responses = torch.full((batch, response_len), PAD_ID, dtype=torch.long)
    mask = torch.zeros(batch, response_len, dtype=torch.bool)
    finished = torch.zeros(batch, dtype=torch.bool)
    sequence = prompts
    past = None
    for t in range(response_len):
        out = model(input_ids=sequence if past is None else sequence[:, -1:], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1].float() / temperature
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
        token = torch.where(finished, torch.full_like(token, PAD_ID), token)
        responses[:, t] = token
        mask[:, t] = ~finished
        finished = finished | (token == EOS_ID)
        sequence = torch.cat([sequence, token.unsqueeze(1)], dim=1)
        if bool(finished.all()):
            break
    return responses, mask
