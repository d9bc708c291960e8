"""The two tiny worlds' common parts: a character-level tokenizer and a small Llama, built offline.

The CPU testbed (`m2po.testbed`) and the CPU backend for verl's trainer (`m2po.cpu_backend.tiny`)
each build a tiny policy from these. What they keep apart differs for a reason: the testbed's
vocabulary is digits plus BOS/EOS/PAD and its policy masks every logit but digits and EOS (a
3-token-answer task whose policy is the whole model), while the CPU backend's is ChatML with
letters and punctuation, because verl's chat templates and prompt building run unchanged on it.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def char_level_tokenizer(
    symbols: list[str], unk_token: str, special_tokens: tuple[str, ...] = (), **token_kwargs
) -> PreTrainedTokenizerFast:
    """One token per character of `symbols`; `special_tokens` (which must be in `symbols`) are
    matched whole before the split. `token_kwargs`: bos_token, eos_token, pad_token, ..."""
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()  # decode joins characters without spaces
    if special_tokens:
        core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=core, **token_kwargs)


def tiny_llama(seed: int, **llama_config) -> LlamaForCausalLM:
    """A randomly initialised `LlamaForCausalLM` with tied embeddings, seeded: `llama_config` are
    `LlamaConfig` arguments (sizes, special token ids)."""
    import torch

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **llama_config))
