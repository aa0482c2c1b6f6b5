"""KV cache: paged blocks for full-attention layers, a ring of `sliding_window` entries per
sequence for sliding layers.

Keys are stored after RoPE. A full layer needs every past position, so its cache grows in blocks of
`block_size` tokens taken from a shared pool (admission control counts these blocks). A sliding layer
only ever looks at the last 128 positions, so each sequence owns one ring of exactly that many
entries; position p lives at ring index p % window.

Within a step, attention reads the PAST from the cache and the step's own new keys directly (see
attention.py), then the new keys are written. That is what lets a prefill chunk longer than the
window attend correctly although the ring keeps only the last window of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_shards.batch import StepLayout
from model_shards.config import GptOssConfig


class KVCacheFull(RuntimeError):
    """Not enough free blocks or sequence slots for a reservation."""


@dataclass
class StepKV:
    """The cache's index tensors for one step (built once, used by every layer)."""

    full_past_rows: torch.Tensor  # [S, P] pool row of each past position (0 where invalid)
    full_past_valid: torch.Tensor  # [S, P] bool
    full_write_rows: torch.Tensor  # [T] pool row for every new token
    ring_past_rows: torch.Tensor  # [S, W] ring row of each ring entry
    ring_past_pos: torch.Tensor  # [S, W] position held by that entry
    ring_past_valid: torch.Tensor  # [S, W] bool
    ring_write_tokens: torch.Tensor  # [T'] flat token indices that land in the ring (last W per chunk)
    ring_write_rows: torch.Tensor  # [T'] their ring rows


class KVCache:
    def __init__(self, cfg: GptOssConfig, num_blocks: int, max_seqs: int, block_size: int = 16,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or max_seqs < 1 or block_size < 1:
            raise ValueError("num_blocks, max_seqs and block_size must be positive")
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seqs = max_seqs
        self.window = cfg.sliding_window
        self.device = torch.device(device)
        kv = (cfg.num_key_value_heads, cfg.head_dim)
        # Per layer: full layers [num_blocks * block_size, nkv, d]; sliding [max_seqs * window, nkv, d].
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        for layer in range(cfg.num_hidden_layers):
            rows = max_seqs * self.window if cfg.is_sliding(layer) else num_blocks * block_size
            self.k.append(torch.zeros(rows, *kv, dtype=dtype, device=self.device))
            self.v.append(torch.zeros(rows, *kv, dtype=dtype, device=self.device))
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}
        self._slots: dict[int, int] = {}

    # -- accounting ------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _missing(self, seq_id: int, num_tokens: int) -> tuple[int, int]:
        blocks = self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ()))
        return max(blocks, 0), 0 if seq_id in self._slots else 1

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Make room for positions [0, num_tokens) of a sequence; all or nothing."""
        blocks, slots = self._missing(seq_id, num_tokens)
        if blocks > len(self._free_blocks) or slots > len(self._free_slots):
            raise KVCacheFull(f"sequence {seq_id} needs {blocks} more KV blocks and {slots} slot(s); "
                              f"{len(self._free_blocks)} blocks and {len(self._free_slots)} slots are free")
        if slots:
            self._slots[seq_id] = self._free_slots.pop()
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free_blocks.pop() for _ in range(blocks))

    def free(self, seq_id: int) -> None:
        self._free_blocks.extend(reversed(self._tables.pop(seq_id, [])))
        if seq_id in self._slots:
            self._free_slots.append(self._slots.pop(seq_id))

    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    def usage(self) -> float:
        """Fraction of full-layer blocks in use (the resource admission control runs out of)."""
        return 1.0 - len(self._free_blocks) / self.num_blocks

    # -- one step --------------------------------------------------------------------------------
    def view(self, layout: StepLayout) -> StepKV:
        bs, w, dev = self.block_size, self.window, self.device
        for chunk in layout.chunks:
            if len(self._tables.get(chunk.seq_id, ())) < self.blocks_for(chunk.start + chunk.length):
                raise KVCacheFull(f"sequence {chunk.seq_id} has no KV reserved up to position "
                                  f"{chunk.start + chunk.length}")
        width = max(len(self._tables[c.seq_id]) for c in layout.chunks)
        table = torch.tensor([self._tables[c.seq_id] + [0] * (width - len(self._tables[c.seq_id]))
                              for c in layout.chunks], dtype=torch.long, device=dev)  # [S, blocks]
        slots = torch.tensor([self._slots[c.seq_id] for c in layout.chunks], dtype=torch.long, device=dev)  # [S]
        past = layout.past_len  # [S]

        past_blocks = self.blocks_for(int(past.max()))
        pos = torch.arange(past_blocks * bs, device=dev)  # [P]
        full_past_rows = table[:, :past_blocks].repeat_interleave(bs, dim=1) * bs + pos % bs  # [S, P]
        full_past_valid = pos[None, :] < past[:, None]

        positions, seq = layout.positions, layout.seq_index
        full_write_rows = table[seq, positions // bs] * bs + positions % bs  # [T]

        j = torch.arange(w, device=dev)[None, :]  # [1, W]
        last = (past - 1)[:, None]  # [S, 1] newest cached position
        ring_pos = last - torch.remainder(last - j, w)  # [S, W] newest position p <= last with p % W == j
        ring_rows = slots[:, None] * w + j

        ends = past + torch.tensor([c.length for c in layout.chunks], device=dev)  # [S]
        keep = positions >= ends[seq] - w  # only the last W tokens of a chunk stay in the ring
        ring_tokens = torch.nonzero(keep).squeeze(1)
        return StepKV(
            full_past_rows=full_past_rows * full_past_valid,
            full_past_valid=full_past_valid,
            full_write_rows=full_write_rows,
            ring_past_rows=ring_rows,
            ring_past_pos=ring_pos,
            ring_past_valid=ring_pos >= 0,
            ring_write_tokens=ring_tokens,
            ring_write_rows=slots[seq[ring_tokens]] * w + positions[ring_tokens] % w,
        )

    def past(self, layer: int, view: StepKV) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> keys, values [S, P, nkv, d], their positions [S, P] and validity [S, P]."""
        if self.cfg.is_sliding(layer):
            rows, pos, valid = view.ring_past_rows, view.ring_past_pos, view.ring_past_valid
        else:
            rows, valid = view.full_past_rows, view.full_past_valid
            pos = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
        return self.k[layer][rows], self.v[layer][rows], pos, valid

    def write(self, layer: int, view: StepKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, nkv, d] of this step's tokens."""
        if self.cfg.is_sliding(layer):
            self.k[layer][view.ring_write_rows] = k[view.ring_write_tokens]
            self.v[layer][view.ring_write_rows] = v[view.ring_write_tokens]
        else:
            self.k[layer][view.full_write_rows] = k
            self.v[layer][view.full_write_rows] = v
