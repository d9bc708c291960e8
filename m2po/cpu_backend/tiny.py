"""The tiny model, tokenizer and task that CPU runs of verl's trainer use, built offline and cached.

- Model: a 2-layer Llama (`LlamaForCausalLM`, ~77k parameters, grouped-query attention), random
  weights. (Not Qwen2: transformers 5 loads a `qwen2` folder's tokenizer as Qwen2Tokenizer, which
  replaces the character-level pre-tokenizer with its byte-level one.)
- Tokenizer: character level with ChatML special tokens and a ChatML chat template, so verl's Qwen
  chat handling (continuous-token building) works unchanged (`m2po.utils.tiny_llama`, shared with
  the testbed, which keeps its own digits-only vocabulary and task).
- Task: single-digit addition prompts ("3+4="); the reward (`m2po.cpu_backend.smoke_reward`) is 1
  when the answer's digit appears in the response. A random model scores ~25%, so groups have
  reward variance and the policy gradient is not zero from step 1. (Not the testbed's
  `AdditionTask`: verl reads chat-message rows from parquet files and scores them with a reward
  function, and an exact-match reward would give a random tiny model all-zero groups.)

Everything lives under `<cache>/cpu-tiny-v<VERSION>/` (cache: `$M2PO_CACHE` or `~/.cache/m2po`),
is built on first use under a file lock and written atomically. The hydra overlay `cpu/tiny.yaml`
refers to it through the resolver `${m2po_cpu_tiny:model}` / `:train` / `:val`.
"""

from __future__ import annotations

import fcntl
import json
import os
import string

VERSION = 2  # 2: validation rows carry the paper benchmarks' data-source names
DATA_SOURCE = "m2po_cpu_tiny_addition"
IM_START, IM_END, END_OF_TEXT, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<unk>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, UNK)
SYMBOLS = list(SPECIAL_TOKENS) + list("\n +-=?.,") + list(string.digits) + list(string.ascii_lowercase)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TRAIN_ROWS, VAL_ROWS = 256, 16


def cache_root() -> str:
    base = os.environ.get("M2PO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "m2po")
    return os.path.join(base, f"cpu-tiny-v{VERSION}")


def build_tokenizer():
    from m2po.utils.tiny_llama import char_level_tokenizer

    tokenizer = char_level_tokenizer(
        SYMBOLS, unk_token=UNK, special_tokens=SPECIAL_TOKENS, eos_token=IM_END, pad_token=END_OF_TEXT
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(seed: int = 0, hidden_size: int = 64, intermediate_size: int = 128, num_attention_heads: int = 4):
    """The tiny Llama (head size 16 by default; `m2po check --gpu` asks for 64, which GPU kernels take)."""
    from transformers import GenerationConfig

    from m2po.utils.tiny_llama import tiny_llama

    ids = {symbol: i for i, symbol in enumerate(SYMBOLS)}
    model = tiny_llama(
        seed,
        vocab_size=len(SYMBOLS),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[END_OF_TEXT],
        torch_dtype="float32",
    )
    model.generation_config = GenerationConfig(eos_token_id=[ids[IM_END], ids[END_OF_TEXT]], pad_token_id=ids[END_OF_TEXT])
    return model


def addition_rows(count: int, split: str, seed: int) -> list[dict]:
    """verl RL rows: chat prompt, ground truth, data source; a + b <= 9 so answers are one digit.
    Validation rows take the data-source names of the paper's eight benchmarks in turn, so that a
    smoke run's validation metrics have the layout `m2po report` reads from a real run."""
    import random

    from m2po.data import PAPER_BENCHMARKS

    rng = random.Random(seed)
    rows = []
    for index in range(count):
        a = rng.randint(0, 9)
        b = rng.randint(0, 9 - a)
        rows.append(
            {
                "data_source": PAPER_BENCHMARKS[index % len(PAPER_BENCHMARKS)] if split == "val" else DATA_SOURCE,
                "prompt": [{"role": "user", "content": f"{a}+{b}="}],
                "ability": "arithmetic",
                "reward_model": {"style": "rule", "ground_truth": str(a + b)},
                "extra_info": {"split": split, "index": index},
            }
        )
    return rows


def _build(directory: str) -> None:
    import pandas as pd

    from m2po.utils.atomic_io import atomic_directory

    with atomic_directory(directory) as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model().save_pretrained(model_dir, safe_serialization=True)
        build_tokenizer().save_pretrained(model_dir)
        for split, count, seed in (("train", TRAIN_ROWS, 1), ("val", VAL_ROWS, 2)):
            pd.DataFrame(addition_rows(count, split, seed)).to_parquet(os.path.join(tmp, f"{split}.parquet"), index=False)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"version": VERSION, "train_rows": TRAIN_ROWS, "val_rows": VAL_ROWS}, f)


def ensure_built() -> str:
    """The cache directory, built first if missing (safe to call from many processes at once)."""
    directory = cache_root()
    if os.path.exists(os.path.join(directory, "manifest.json")):
        return directory
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(directory, "manifest.json")):
            _build(directory)
    return directory


ARTIFACTS = {"model": "model", "train": "train.parquet", "val": "val.parquet"}


def artifact_path(name: str) -> str:
    if name not in ARTIFACTS:
        raise ValueError(f"m2po_cpu_tiny: unknown artifact {name!r}; choose one of {sorted(ARTIFACTS)}")
    return os.path.join(ensure_built(), ARTIFACTS[name])
