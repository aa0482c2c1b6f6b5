"""Read access to a gpt-oss checkpoint directory in either layout.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte offsets of every
tensor) and the raw tensor bytes. Rows [a, b) of a tensor are one contiguous byte range, so asking
for experts [a, b) of an [E, ...] tensor reads exactly those bytes with one pread: an expert shard
holding 1/M of the experts reads 1/M of the expert bytes. (Memory-mapping, as safetensors' own
slices do, maps the whole file into every actor and lets kernel readahead pull in far more than
the slice: 16 MB for a 1 MB slice on a machine with 8 MB readahead.)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from model_shards.config import GptOssConfig, load_config
from model_shards.layout import HF, ORIGINAL

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A directory that is not a readable gpt-oss checkpoint."""


def _has_hf_weights(root: Path) -> bool:
    return (root / INDEX_FILE).exists() or any(root.glob("model*.safetensors"))


def detect_layout(root: Path) -> str:
    """"hf" when the directory has transformers-style weights at its root, else "original" when
    it has an `original/` folder (or is one). The hub repos carry both; the HF root is preferred."""
    if (root / "config.json").exists() and _has_hf_weights(root):
        try:
            model_type = json.loads((root / "config.json").read_text()).get("model_type")
        except json.JSONDecodeError:
            model_type = None
        if model_type is not None:
            return HF
        return ORIGINAL  # a config without model_type is the reference format pointed at directly
    if (root / "original" / "config.json").exists():
        return ORIGINAL
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    raise CheckpointError(f"{root} holds neither config.json with model*.safetensors nor original/config.json")


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor data in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> where its bytes are, from one safetensors file's header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise CheckpointError(f"{path.name} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} has an unreadable safetensors header") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + begin, end - begin)
    return entries


def _weight_map(directory: Path) -> dict[str, TensorEntry]:
    """Tensor name -> location. The files are those of the index when there is one, else every
    *.safetensors file in the directory (not its subfolders: the HF root must not pick up original/)."""
    index = directory / INDEX_FILE
    if index.exists():
        entries = json.loads(index.read_text()).get("weight_map")
        if not isinstance(entries, dict):
            raise CheckpointError(f"{index.name} has no weight_map")
        files = sorted({directory / file for file in entries.values()})
        missing = sorted(p.name for p in files if not p.exists())
        if missing:
            raise CheckpointError(f"{index.name} names files that are not there: {missing}")
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {directory}")
    mapping: dict[str, TensorEntry] = {}
    for path in files:
        mapping.update(read_header(path))
    return mapping


class Checkpoint:
    """One checkpoint: its layout, config and tensors. Use as a context manager (file descriptors
    stay open while a loader reads many tensors)."""

    def __init__(self, root: str | Path, layout: str | None = None) -> None:
        self.root = Path(root)
        self.layout = layout or detect_layout(self.root)
        if self.layout not in (HF, ORIGINAL):
            raise CheckpointError(f"unknown layout {self.layout!r}")
        self.directory = self.root
        if self.layout == ORIGINAL and (self.root / "original" / "config.json").exists():
            self.directory = self.root / "original"
        self.config: GptOssConfig = load_config(self.root, self.layout)
        self._tensors = _weight_map(self.directory)
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0  # tensor bytes read so far, for progress and tests

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.directory.name}/") from None

    def has(self, name: str) -> bool:
        return name in self._tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The whole tensor, or rows [a, b) of its first dimension (only those bytes are read)."""
        entry = self._entry(name)
        length = entry.shape[0] if entry.shape else 1
        a, b = rows if rows is not None else (0, length)
        if not 0 <= a < b <= length:
            raise CheckpointError(f"rows [{a}, {b}) out of range for {name!r} with {length} rows")
        row_bytes = entry.nbytes // length if length else 0
        buffer = bytearray((b - a) * row_bytes)
        if entry.path not in self._fds:
            self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
        got = os.preadv(self._fds[entry.path], [buffer], entry.offset + a * row_bytes)
        if got != len(buffer):
            raise CheckpointError(f"{entry.path.name} is truncated: {name!r} needs {len(buffer)} bytes, got {got}")
        self.bytes_read += len(buffer)
        shape = ((b - a), *entry.shape[1:]) if entry.shape else ()
        if not buffer:
            return torch.empty(shape, dtype=entry.dtype)
        return torch.frombuffer(buffer, dtype=entry.dtype).reshape(shape)
