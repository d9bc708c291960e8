"""Convert a TransferQueue batch (verl v1's storage) to a flat dict of tensors and back.

The stale buffer stores `dict[str, Tensor]` (safetensors, narrowed, hashed). A v1 batch is a
TensorDict whose per-sample fields are jagged nested tensors, dense tensors, or non-tensor
Python values (chat messages, ground truths, ids), plus the keys and tags TransferQueue tracks.
Tensor fields keep their exact bytes; non-tensor values go through JSON (never pickle), with
numpy arrays and tensors inside them tagged so they come back with their dtype.

Naming in the flat dict:
    jagged/<field>/values, jagged/<field>/lengths    per-sample tensors (concatenated along dim 0)
    dense/<field>                                   tensors that came back as (batch, ...)
    json/<field>                                    UTF-8 JSON list, one value per sample
    meta/keys, meta/tags                            TransferQueue keys and per-sample tags
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict

_TENSOR_TAG = "__m2po_tensor__"
_NDARRAY_TAG = "__m2po_ndarray__"


def _json_default(value: Any):
    if isinstance(value, torch.Tensor):
        return {_TENSOR_TAG: value.tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, np.ndarray):
        return {_NDARRAY_TAG: value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in the stale buffer (JSON only, no pickle)")


def _json_object_hook(obj: dict):
    if _TENSOR_TAG in obj:
        return torch.tensor(obj[_TENSOR_TAG], dtype=getattr(torch, obj["dtype"]))
    if _NDARRAY_TAG in obj:
        return np.array(obj[_NDARRAY_TAG], dtype=obj["dtype"])
    return obj


def _json_tensor(value: Any, what: str) -> torch.Tensor:
    try:
        text = json.dumps(value, default=_json_default, allow_nan=True)
    except TypeError as error:
        raise TypeError(f"{what}: {error}") from None
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8).clone()


def _from_json_tensor(tensor: torch.Tensor) -> Any:
    return json.loads(bytes(tensor.numpy().tobytes()).decode(), object_hook=_json_object_hook)


def _per_sample_values(value: Any, size: int) -> list:
    if isinstance(value, NonTensorStack):
        values = value.tolist()
    elif isinstance(value, NonTensorData):
        values = [value.data] * size
    else:
        values = list(value)
    if len(values) != size:
        raise ValueError(f"expected {size} values, got {len(values)}")
    return values


def encode_batch(data: TensorDict, keys: list[str], tags: list[dict]) -> dict[str, torch.Tensor]:
    """Flatten a batch read from TransferQueue (`kv_batch_get`, all fields) plus its keys/tags."""
    size = len(keys)
    if data.batch_size and data.batch_size[0] != size:
        raise ValueError(f"batch has {data.batch_size[0]} samples but {size} keys")
    flat = {"meta/keys": _json_tensor(list(keys), "keys"), "meta/tags": _json_tensor(list(tags), "tags")}
    for field in data.keys():
        value = data.get(field)
        if isinstance(value, torch.Tensor) and value.is_nested:
            flat.update(_encode_jagged(field, value))
        elif isinstance(value, torch.Tensor):
            flat[f"dense/{field}"] = value.detach().cpu().contiguous()
        else:
            flat[f"json/{field}"] = _json_tensor(_per_sample_values(value, size), f"field {field!r}")
    return flat


def _encode_jagged(field: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """values (samples concatenated along their first dimension, trailing dims flattened), lengths,
    trailing shape. A packed jagged tensor (TransferQueue's layout) already holds the concatenation:
    it is sliced, not rebuilt sample by sample (the same bytes either way)."""
    packed = value.layout == torch.jagged and value.lengths() is None and getattr(value, "_ragged_idx", None) == 1
    if packed and value.size(0) > 0:
        offsets = value.offsets()
        values = value.values()[int(offsets[0]) : int(offsets[-1])]
        lengths = offsets.diff().to(torch.int64)
        trailing_shape = tuple(values.shape[1:])
        values = values.reshape(values.shape[0], -1) if values.dim() > 1 else values
    else:
        samples = value.unbind()
        values = torch.cat([s.reshape(s.shape[0], -1) if s.dim() > 1 else s for s in samples])
        lengths = torch.tensor([s.shape[0] for s in samples], dtype=torch.int64)
        trailing = {tuple(s.shape[1:]) for s in samples}
        if len(trailing) > 1:
            raise ValueError(f"field {field!r}: samples differ beyond their first dimension: {trailing}")
        trailing_shape = next(iter(trailing), ())
    return {
        f"jagged/{field}/values": values.detach().cpu().contiguous(),
        f"jagged/{field}/lengths": lengths.cpu(),
        f"jagged/{field}/trailing_shape": torch.tensor(trailing_shape, dtype=torch.int64),
    }


def decode_batch(flat: dict[str, torch.Tensor]) -> tuple[list[str], list[dict], list[dict[str, Any]]]:
    """(keys, tags, one dict of fields per sample) — feed the samples to verl's
    `list_of_dict_to_tensordict` and `kv_batch_put` them back."""
    keys = _from_json_tensor(flat["meta/keys"])
    tags = _from_json_tensor(flat["meta/tags"])
    samples: list[dict[str, Any]] = [{} for _ in keys]
    for name, tensor in flat.items():
        kind, _, rest = name.partition("/")
        if kind == "dense":
            for sample, row in zip(samples, tensor.unbind(0), strict=True):
                sample[rest] = row
        elif kind == "json":
            for sample, item in zip(samples, _from_json_tensor(tensor), strict=True):
                sample[rest] = item
        elif kind == "jagged" and rest.endswith("/values"):
            field = rest.removesuffix("/values")
            lengths = flat[f"jagged/{field}/lengths"].tolist()
            trailing = tuple(flat[f"jagged/{field}/trailing_shape"].tolist())
            for sample, piece in zip(samples, torch.split(tensor, lengths), strict=True):
                sample[field] = piece.reshape(piece.shape[0], *trailing) if trailing else piece
    return keys, tags, samples
