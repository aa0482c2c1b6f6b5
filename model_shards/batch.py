"""The layout of one step's flat batch of tokens.

A step carries, for each of S sequences, a contiguous chunk of new tokens at positions
[start, start + length): a whole prompt, part of one (chunked prefill), or one decode token. The
model runs on the flat [T] batch (vLLM style); attention pads it to [S, N] per sequence. The index
tensors for that are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SeqChunk:
    seq_id: int
    start: int  # tokens of this sequence already in the KV cache = position of the first new token
    length: int  # new tokens in this step (>= 1)


@dataclass
class StepLayout:
    chunks: tuple[SeqChunk, ...]
    positions: torch.Tensor  # [T] absolute position of every token
    seq_index: torch.Tensor  # [T] which chunk (0..S-1) a token belongs to
    token_slot: torch.Tensor  # [T] its index inside the chunk (0..N-1)
    q_pos: torch.Tensor  # [S, N] positions padded per chunk (meaningless where ~q_valid)
    q_valid: torch.Tensor  # [S, N] bool
    last_token: torch.Tensor  # [S] flat index of each chunk's last token (its logits predict the next)
    past_len: torch.Tensor  # [S] cached tokens before this step

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def max_chunk(self) -> int:
        return int(self.q_pos.shape[1])


def plan_step(chunks: list[SeqChunk] | tuple[SeqChunk, ...], device: torch.device | str = "cpu") -> StepLayout:
    if not chunks:
        raise ValueError("a step needs at least one sequence")
    if any(c.length < 1 or c.start < 0 for c in chunks):
        raise ValueError("every chunk needs length >= 1 and start >= 0")
    lengths = torch.tensor([c.length for c in chunks], dtype=torch.long)
    starts = torch.tensor([c.start for c in chunks], dtype=torch.long)
    n_max = int(lengths.max())
    seq_index = torch.repeat_interleave(torch.arange(len(chunks)), lengths)  # [T]
    offsets = torch.cumsum(lengths, 0) - lengths  # [S] flat index of each chunk's first token
    token_slot = torch.arange(int(lengths.sum())) - offsets[seq_index]  # [T]
    slots = torch.arange(n_max)[None, :]  # [1, N]
    return StepLayout(
        chunks=tuple(chunks),
        positions=(starts[seq_index] + token_slot).to(device),
        seq_index=seq_index.to(device),
        token_slot=token_slot.to(device),
        q_pos=(starts[:, None] + slots).to(device),
        q_valid=(slots < lengths[:, None]).to(device),
        last_token=(offsets + lengths - 1).to(device),
        past_len=starts.to(device),
    )


def pad(x: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[T, ...] -> [S, N, ...], zeros where a chunk is shorter than N."""
    out = x.new_zeros((layout.num_seqs, layout.max_chunk, *x.shape[1:]))
    out[layout.seq_index, layout.token_slot] = x
    return out


def unpad(x: torch.Tensor, layout: StepLayout) -> torch.Tensor:
    """[S, N, ...] -> [T, ...]."""
    return x[layout.seq_index, layout.token_slot]
