"""Encoding of data-plane messages.

The per-layer messages (MoeRequest, ShardRequest, MoeRoute, ShardResult) hold only ints, floats, bools
and tensors; they get a fixed binary header built from their dataclass fields, because pickling them
cost several times the channel itself per message inside the actors (docs/measurements.md).
Everything else (one ReplicaStep and StepResult per step) is pickled, with its tensors taken out of
band. Either way the tensors' bytes follow the header raw: sent from a numpy view of the tensor (no
copy for a contiguous CPU tensor), received as numpy-constructed views of the one receive buffer.
These views take about 40% off a small message's send + receive against torch.frombuffer / detach /
to / contiguous calls, a torch call's overhead each (docs/measurements.md).

Header: b"F", type index, tensor count, each tensor's rank, then one struct of the fields in order
(int: q, float: d, bool: ?, tensor: dtype code B and its dims); or b"P" + pickle of (tensor specs, body).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import pickle
import struct
from typing import Any, Callable

import numpy as np
import torch

from cluster.dataplane.messages import MoeRequest, MoeRoute, ShardRequest, ShardResult
from model_shards.syncs import host_numpy

FAST_TYPES = (MoeRequest, ShardRequest, MoeRoute, ShardResult)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.float64)
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
          torch.uint8: np.uint8, torch.bool: np.bool_, torch.float64: np.float64}
ALIGN = 16  # tensors start at aligned offsets of the received buffer
_KINDS = {"int": "i", "float": "f", "bool": "b", "torch.Tensor": "t"}


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


def host_array(t: torch.Tensor) -> np.ndarray:
    """The bytes of `t` as a numpy array sharing its memory when t is already a contiguous CPU
    tensor (the usual case), else of a host copy. bf16 has no numpy type: it travels as int16."""
    if not t.is_cpu or t.requires_grad or not t.is_contiguous():
        t = t.detach().to("cpu").contiguous()
    return host_numpy(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def _tensor(data: bytearray, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing `data` at `offset` (numpy's constructor is the cheapest view there is)."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.ndarray(shape, np.int16, data, offset)).view(torch.bfloat16)
    return torch.from_numpy(np.ndarray(shape, _NUMPY[dtype], data, offset))


@functools.lru_cache(maxsize=256)
def _format(index: int, ndims: tuple[int, ...]) -> struct.Struct:
    """The one struct of a fast message's fields, given its tensors' ranks."""
    parts, ranks = ["<"], iter(ndims)
    for _, kind in _LAYOUTS[FAST_TYPES[index]][1]:
        parts.append({"i": "q", "f": "d", "b": "?"}.get(kind) or f"B{next(ranks)}q")
    return struct.Struct("".join(parts))


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def encode(message: Any) -> tuple[bytes, list[np.ndarray]]:
    """-> header, arrays whose raw bytes follow it (each padded to ALIGN)."""
    header, tensors = encode_tensors(message)
    return header, [host_array(t) for t in tensors]


def encode_tensors(message: Any) -> tuple[bytes, list[torch.Tensor]]:
    """-> header, the message's tensors as they are (on their device): for transports that move
    tensors themselves (dist_channel.py)."""
    fast = _LAYOUTS.get(type(message))
    if fast is None:
        tensors: list[torch.Tensor] = []
        body = io.BytesIO()
        _Pickler(body, tensors).dump(message)
        specs = [(t.dtype, tuple(t.shape)) for t in tensors]
        return b"P" + pickle.dumps((specs, body.getvalue()), protocol=pickle.HIGHEST_PROTOCOL), tensors
    index, layout = fast
    values: list[int | float] = []  # the header struct's fields: ints, floats, dtype codes and dims
    ndims, tensors = [], []
    for name, kind in layout:
        value = getattr(message, name)
        if kind == "t":
            shape = value.shape
            values.append(_DTYPE_CODE[value.dtype])
            values.extend(shape)
            ndims.append(len(shape))
            tensors.append(value)
        else:
            values.append(value)
    ranks = tuple(ndims)
    return bytes((70, index, len(ranks), *ranks)) + _format(index, ranks).pack(*values), tensors  # 70 = "F"


TensorSource = Callable[[torch.dtype, tuple[int, ...]], torch.Tensor]  # the next tensor, given its spec


def rebuild(header: bytes | bytearray | memoryview, tensor: TensorSource) -> Any:
    """The message whose header this is, parsed once; `tensor(dtype, shape)` is asked for each of its
    tensors in order (a view of a receive buffer, or a tensor received on its own)."""
    if header[0] == 80:  # "P"
        specs, body = pickle.loads(memoryview(header)[1:])
        return _Unpickler(io.BytesIO(body), [tensor(dtype, tuple(shape)) for dtype, shape in specs]).load()
    index, count = header[1], header[2]
    ndims = tuple(header[3:3 + count])
    values = _format(index, ndims).unpack_from(header, 3 + count)
    cls = FAST_TYPES[index]
    fields, i, ranks = [], 0, iter(ndims)
    for _, kind in _LAYOUTS[cls][1]:
        if kind == "t":
            rank = next(ranks)
            fields.append(tensor(DTYPES[values[i]], tuple(values[i + 1:i + 1 + rank])))
            i += 1 + rank
        else:
            fields.append(values[i])
            i += 1
    return cls(*fields)


def decode(data: bytearray, header_len: int) -> Any:
    """Rebuild a message from one received buffer: header, then the tensors' padded bytes. The
    tensors view `data` (no copy)."""
    offset = header_len

    def view(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        nonlocal offset
        t = _tensor(data, offset, dtype, shape)
        offset += padded(math.prod(shape) * dtype.itemsize)
        return t

    return rebuild(memoryview(data)[:header_len], view)
