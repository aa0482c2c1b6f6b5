"""The layout of one step's flat batch of tokens, and how a step's host-built indices reach the device.

A step carries, for each of S sequences, a contiguous chunk of new tokens at positions
[start, start + length): a whole prompt, part of one (chunked prefill), or one decode token. The
model runs on the flat [T] batch (vLLM style).

Everything a step needs from the host (positions, block rows, lengths) is computed on the host from
Python integers, never read back from the device, and reaches the device in one asynchronous copy
per step part (`to_device`): on a GPU, a blocking copy or a read-back stops the host until the
device's queue drains (syncs.py counts both).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from model_shards.syncs import host_work


@dataclass(frozen=True)
class SeqChunk:
    seq_id: int
    start: int  # tokens of this sequence already in the KV cache = position of the first new token
    length: int  # new tokens in this step (>= 1)


@dataclass
class StepLayout:
    chunks: tuple[SeqChunk, ...]
    first: tuple[int, ...]  # [S] flat index of each chunk's first token (host)
    positions: torch.Tensor  # [T] absolute position of every token (device)
    last_token: torch.Tensor  # [R] flat index of the last token of each sampled chunk (its logits predict the next; device)

    @property
    def num_tokens(self) -> int:
        return self.first[-1] + self.chunks[-1].length

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)


def to_device(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host tensors (integer or bool) -> the same on `device`, through one pinned buffer and one
    asynchronous copy (on the CPU: the tensors themselves)."""
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    with host_work():
        flat = torch.cat([t.reshape(-1).to(torch.long) for t in tensors])  # [sum of sizes]
        if device.type == "cuda":
            flat = flat.pin_memory()  # the copy below can then run asynchronously
    on_device = flat.to(device, non_blocking=True)
    out, offset = [], 0
    for t in tensors:
        part = on_device[offset:offset + t.numel()].view(t.shape)
        out.append(part if t.dtype == torch.long else part.to(t.dtype))
        offset += t.numel()
    return out


def plan_step(chunks: list[SeqChunk] | tuple[SeqChunk, ...], device: torch.device | str = "cpu",
              sample: list[int] | None = None) -> StepLayout:
    """`sample`: the chunks whose next token is chosen (all when None): the unembedding, the costliest
    matmul of a decode step, runs for their last tokens only."""
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    if any(c.length < 1 or c.start < 0 for c in chunks):
        raise ValueError("every chunk needs length >= 1 and start >= 0")
    first = tuple(accumulate((c.length for c in chunks[:-1]), initial=0))
    positions = torch.tensor([p for c in chunks for p in range(c.start, c.start + c.length)], dtype=torch.long)
    rows = range(len(chunks)) if sample is None else sample
    last = torch.tensor([first[i] + chunks[i].length - 1 for i in rows], dtype=torch.long)  # [R]
    positions, last = to_device([positions, last], device)
    return StepLayout(tuple(chunks), first, positions, last)
