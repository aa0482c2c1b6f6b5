"""Encoding of data-plane messages.

The per-layer messages (MoeRequest, MoeResult, ShardRequest, ShardResult) hold only ints, floats and
tensors; they get a fixed binary header built from their dataclass fields, because pickling them
cost 100-300 us per message inside the actors (measured; see README "Data plane"), several times the
channel itself. Everything else (one ReplicaStep and StepResult per step) is pickled, with its
tensors taken out of band. Either way the tensors' bytes follow the header raw.

Header: b"F", type index, tensor count, each tensor's rank, then one struct of the fields in order
(int: q, float: d, tensor: dtype code B and its dims); or b"P" + pickle of (tensor specs, body).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import struct
from typing import Any, Callable

import torch

from cluster.messages import MoeRequest, MoeResult, ShardRequest, ShardResult

FAST_TYPES = (MoeRequest, MoeResult, ShardRequest, ShardResult)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.float64)
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
_KINDS = {"int": "i", "float": "f", "torch.Tensor": "t"}


def _layout(cls: type) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, _KINDS[str(f.type)]) for f in dataclasses.fields(cls))


_LAYOUTS = {cls: (index, _layout(cls)) for index, cls in enumerate(FAST_TYPES)}


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._tensors = tensors

    def persistent_id(self, obj: Any) -> int | None:
        if isinstance(obj, torch.Tensor):
            self._tensors.append(obj)
            return len(self._tensors) - 1
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        return self._tensors[pid]


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous()


def numpy_view(t: torch.Tensor) -> Any:
    """A buffer-protocol view of a contiguous CPU tensor (bf16 has no numpy type: use int16)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


@functools.lru_cache(maxsize=256)
def _format(index: int, ndims: tuple[int, ...]) -> struct.Struct:
    """The one struct of a fast message's fields, given its tensors' ranks."""
    parts, ranks = ["<"], iter(ndims)
    for _, kind in _LAYOUTS[FAST_TYPES[index]][1]:
        parts.append("q" if kind == "i" else "d" if kind == "f" else f"B{next(ranks)}q")
    return struct.Struct("".join(parts))


def encode(message: Any) -> tuple[bytes, list[torch.Tensor]]:
    """-> header, tensors (CPU, contiguous) whose raw bytes follow it."""
    fast = _LAYOUTS.get(type(message))
    tensors: list[torch.Tensor] = []
    if fast is None:
        body = io.BytesIO()
        _Pickler(body, tensors).dump(message)
        tensors = [_cpu(t) for t in tensors]
        specs = [(t.dtype, tuple(t.shape)) for t in tensors]
        return b"P" + pickle.dumps((specs, body.getvalue()), protocol=pickle.HIGHEST_PROTOCOL), tensors
    index, layout = fast
    values: list[Any] = []
    for name, kind in layout:
        value = getattr(message, name)
        if kind == "t":
            value = _cpu(value)
            tensors.append(value)
            values.append(_DTYPE_CODE[value.dtype])
            values.extend(value.shape)
        else:
            values.append(value)
    ndims = tuple(t.dim() for t in tensors)
    return bytes((70, index, len(ndims), *ndims)) + _format(index, ndims).pack(*values), tensors  # 70 = "F"


def decode(header: bytes, read_tensor: Callable[[torch.dtype, tuple[int, ...]], torch.Tensor]) -> Any:
    """Rebuild a message; `read_tensor` gives the next tensor of the body."""
    if header[:1] == b"P":
        specs, body = pickle.loads(header[1:])
        tensors = [read_tensor(dtype, shape) for dtype, shape in specs]
        return _Unpickler(io.BytesIO(body), tensors).load()
    index, count = header[1], header[2]
    ndims = tuple(header[3:3 + count])
    values = iter(_format(index, ndims).unpack_from(header, 3 + count))
    cls = FAST_TYPES[index]
    fields, ranks = {}, iter(ndims)
    for name, kind in _LAYOUTS[cls][1]:
        if kind == "t":
            dtype = DTYPES[next(values)]
            fields[name] = read_tensor(dtype, tuple(next(values) for _ in range(next(ranks))))
        else:
            fields[name] = next(values)
    return cls(**fields)
