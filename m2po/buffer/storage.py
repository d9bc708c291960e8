"""Compact, hashed, crash-safe storage of rollout batches (dicts of tensors) with safetensors.

- Integer tensors are stored in the narrowest dtype that holds their values (token ids fit in
  int32 or less) and restored to their original dtype: reading back is bit-identical.
- `content_hash` identifies a batch by its fields, dtypes, shapes and bytes, independent of how
  it is stored; it is what resume tests compare.
- Files are written atomically (`m2po.utils.atomic_io`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from m2po.utils.atomic_io import atomic_write_bytes

Batch = Mapping[str, torch.Tensor]

# Narrowest first; each is tried in order for integer tensors.
_NARROW_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class CorruptCheckpointError(RuntimeError):
    """A saved buffer is incomplete or does not match its recorded hashes."""


def content_hash(batch: Batch, dtypes: Mapping[str, str] | None = None) -> str:
    """sha256 over sorted field names, dtypes, shapes and raw bytes.

    With `dtypes` (a compact batch's original dtypes, see `compact`), each field is widened back
    one at a time while it is hashed: the hash of the restored batch without restoring it whole.
    """
    digest = hashlib.sha256()
    for name in sorted(batch):
        tensor = batch[name].detach().cpu()
        if dtypes is not None:
            tensor = tensor.to(getattr(torch, dtypes[name]))
        tensor = tensor.contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def narrow(tensor: torch.Tensor) -> torch.Tensor:
    """The same integer values in the smallest dtype that holds them (other dtypes unchanged)."""
    if tensor.dtype not in _NARROW_INTS or tensor.numel() == 0:
        return tensor
    low, high = int(tensor.min()), int(tensor.max())
    for dtype in _NARROW_INTS:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return tensor.to(dtype)
    return tensor


def compact(batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(narrowed CPU tensors, original dtype name per field)."""
    tensors, dtypes = {}, {}
    for name, tensor in batch.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"batch field {name!r} must be a tensor, got {type(tensor).__name__}")
        tensor = tensor.detach().cpu().contiguous()
        dtypes[name] = str(tensor.dtype).removeprefix("torch.")
        tensors[name] = narrow(tensor)
    return tensors, dtypes


def restore(tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {name: tensor.to(getattr(torch, dtypes[name])) for name, tensor in tensors.items()}


def nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def atomic_save_tensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, save(dict(tensors), metadata=metadata))


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(f"cannot read {path}: {error}") from error


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CorruptCheckpointError(f"cannot read {path}: {error}") from error
