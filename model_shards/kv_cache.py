"""KV cache storage of one attention replica: paged blocks for every layer, addressed through block
tables that someone else decides (the engine owns allocation: cluster/engine/kv_manager.py). This module only
stores tensors and turns block ids into row indices.

Two pools of blocks: full-attention layers use `num_blocks` blocks (every past position of a sequence
stays), sliding-window layers use `sliding_blocks` blocks of their own (a sequence only keeps the
blocks still inside its window: the engine drops, and reuses, those that fell out). Per layer the
rows are a [blocks * block_size, nkv, d] tensor; block b holds rows [b*bs, (b+1)*bs).

Each sequence has a full table (the blocks of positions [0, n), in order) and a sliding table (block
index -> id, for the blocks inside the window). Keys are stored after RoPE. Within a step, attention
reads the PAST from the cache and the step's own new keys directly (attention.py), then the new keys
are written: every position of a chunk is written to both tables, so a complete block of either kind
holds all its content and can be shared by sequences with the same prefix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from model_shards.batch import SeqChunk, StepLayout, to_device
from model_shards.capabilities import triton_kernels
from model_shards.config import GptOssConfig
from model_shards.flash import aligned
from model_shards.syncs import host_work


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [R, *rest], rows [*idx] (long) -> [*idx, *rest]: the same as table[rows], through
    index_select on the flattened table, which copies whole rows (advanced indexing goes element by
    element on CPU, about three times slower for a decode batch's gather: docs/measurements.md)."""
    flat = table.reshape(table.shape[0], -1)  # a view: cache tensors are contiguous
    return flat.index_select(0, rows.reshape(-1)).view(*rows.shape, *table.shape[1:])


RowsFn = Callable[..., torch.Tensor]  # (chunk index [*], position [*], end=None) -> cache rows [*]


class KVCacheFull(RuntimeError):
    """A step needs positions that the sequence's block tables do not cover."""


@dataclass(frozen=True)
class BlockUpdate:
    """What the engine tells a replica about one sequence's tables before a chunk runs."""

    full: tuple[int, ...] = ()  # block ids appended to the full table (from block 0 on a new sequence)
    sliding: tuple[tuple[int, int], ...] = ()  # (block index, block id) added to the sliding table
    sliding_from: int = 0  # sliding entries below this block index are gone (out of the window)


@dataclass
class SeqTables:
    full: list[int] = field(default_factory=list)
    sliding: dict[int, int] = field(default_factory=dict)


@dataclass
class ChunkKV:
    """One prefill chunk (more than one token): flat tokens [first, first + length) of the step, at
    positions [start, start + length)."""

    first: int
    start: int
    length: int
    full_rows: torch.Tensor  # [start + length] rows of positions [0, start + length)
    slide_rows: torch.Tensor  # [aligned(W - 1 + length)] rows of positions from start - W + 1 (0 below 0 and past the end)


@dataclass
class PagedDecode:
    """What the paged decode kernel (kernels/paged_attention.py) reads instead of gathered rows, for
    the G decode tokens of a step (int32, on the device)."""

    full_table: torch.Tensor  # [G, Wf] block ids of logical blocks 0..Wf-1
    full_base: torch.Tensor  # [G] zeros: the full table starts at block 0
    slide_table: torch.Tensor  # [G, Ws] sliding block ids from logical block slide_base on
    slide_base: torch.Tensor  # [G]
    ends: torch.Tensor  # [G] keys of each sequence (its token is at ends - 1)

    def of(self, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, base) of a full or sliding layer."""
        return (self.slide_table, self.slide_base) if sliding else (self.full_table, self.full_base)


@dataclass
class StepKV:
    """The cache's index tensors for one step (built once, used by every layer). Keys are written
    first, then read: every row below includes the step's own tokens."""

    full_write_rows: torch.Tensor  # [T] row of every new token
    slide_write_rows: torch.Tensor  # [T] sliding row of every new token
    decode_tokens: torch.Tensor  # [G] flat index of each one-token chunk (decoding sequences)
    decode_full_rows: torch.Tensor  # [G, Lf] rows of positions [0, Lf) (0 past a sequence's end; Lf aligned)
    decode_full_bias: torch.Tensor | None  # [G, 1, 1, Lf] 0 where the key exists, -inf where padding (None: paged)
    decode_slide_rows: torch.Tensor  # [G, W] rows of the W positions ending at the token
    decode_slide_bias: torch.Tensor | None  # [G, 1, 1, W]
    chunks: list[ChunkKV]
    decode_paged: PagedDecode | None = None  # the same keys as block tables, for the paged kernel


class KVCache:
    def __init__(self, cfg: GptOssConfig, num_blocks: int, block_size: int = 16, sliding_blocks: int | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> None:
        """`sliding_blocks` defaults to `num_blocks`."""
        sliding_blocks = num_blocks if sliding_blocks is None else sliding_blocks
        if min(num_blocks, block_size, sliding_blocks) < 1:
            raise ValueError("num_blocks, sliding_blocks and block_size must be positive")
        self.cfg = cfg
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sliding_blocks = sliding_blocks
        self.window = cfg.sliding_window
        self.device = torch.device(device)
        self.k: list[torch.Tensor] = []  # per layer [rows, nkv, d]
        self.v: list[torch.Tensor] = []
        # one block more per pool than the tables can name: the scratch rows that the padding rows of
        # a static decode batch (decode_graph.py) write and read, so that they touch no sequence's keys
        self.scratch_full, self.scratch_slide = num_blocks * block_size, sliding_blocks * block_size
        for layer in range(cfg.num_hidden_layers):
            blocks = sliding_blocks if cfg.is_sliding(layer) else num_blocks
            shape = ((blocks + 1) * block_size, cfg.num_key_value_heads, cfg.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=self.device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=self.device))
        self.tables: dict[int, SeqTables] = {}
        self._refs: Counter[int] = Counter()  # full block id -> tables that hold it (blocks are shared)
        # decode attention reads the blocks in place through the Triton kernel where it runs (CUDA
        # with triton); the CPU keeps gathered rows and its fused kernel, the faster path there
        self.paged = triton_kernels(self.device)

    # -- tables ----------------------------------------------------------------------------------
    def update(self, seq_id: int, update: BlockUpdate) -> None:
        t = self.tables.setdefault(seq_id, SeqTables())
        t.full.extend(update.full)
        self._refs.update(update.full)
        for index in [i for i in t.sliding if i < update.sliding_from]:
            del t.sliding[index]
        t.sliding.update(update.sliding)

    def forget(self, seq_id: int) -> None:
        t = self.tables.pop(seq_id, None)
        if t is not None:
            self._refs.subtract(t.full)
            for block in t.full:
                if self._refs[block] <= 0:
                    del self._refs[block]

    def place(self, seq_id: int, num_tokens: int) -> None:
        """Tables for one sequence on the first blocks of both pools: for running the model without an
        engine, as tests and scripts do."""
        n = -(-num_tokens // self.block_size)
        if n > min(self.num_blocks, self.sliding_blocks):
            raise KVCacheFull(f"{num_tokens} tokens need {n} blocks of each pool")
        self.update(seq_id, BlockUpdate(tuple(range(n)), tuple((i, i) for i in range(n))))

    def usage(self) -> float:
        """Fraction of full-attention blocks some table holds (a block shared by several sequences
        counts once)."""
        return len(self._refs) / self.num_blocks

    # -- one step --------------------------------------------------------------------------------
    def _rows_of(self, chunks: tuple[SeqChunk, ...]) -> tuple[RowsFn, RowsFn]:
        """The chunks' tables (host) -> functions (chunk index [*], position [*]) -> full / sliding
        rows [*] (sliding: 0 below position 0, and from `end` on when given: alignment padding)."""
        bs, w = self.block_size, self.window
        width = max(self._blocks(c.start + c.length) for c in chunks)
        full, slide, slide_base = [], [], []
        for chunk in chunks:
            t = self.tables.get(chunk.seq_id)
            end = chunk.start + chunk.length
            if t is None or len(t.full) < self._blocks(end):
                raise KVCacheFull(f"sequence {chunk.seq_id} has no full-attention blocks up to position {end}")
            full.append(t.full[:width] + [0] * (width - min(width, len(t.full))))
            first = max(0, chunk.start - (w - 1)) // bs  # the sliding blocks this chunk reads or writes
            slide_base.append(first)
            row = [t.sliding.get(i, -1) for i in range(first, self._blocks(end))]
            if -1 in row:  # every one of them holds positions >= 0 that this chunk reads or writes
                raise KVCacheFull("a sequence's sliding-window table lacks a block this step reads or writes")
            slide.append(row)
        full_table = torch.tensor(full, dtype=torch.long)  # [S, blocks]
        slide_width = max(len(row) for row in slide)
        slide_table = torch.tensor([row + [0] * (slide_width - len(row)) for row in slide], dtype=torch.long)
        base = torch.tensor(slide_base, dtype=torch.long)  # [S]

        def full_rows(seq: torch.Tensor, pos: torch.Tensor, end: int | None = None) -> torch.Tensor:
            """(Past the tables' width: padding, which the caller masks.)"""
            return full_table[seq, (pos // bs).clamp(max=width - 1)] * bs + pos % bs

        def slide_rows(seq: torch.Tensor, pos: torch.Tensor, end: int | None = None) -> torch.Tensor:
            blocks = slide_table[seq, (pos.clamp(min=0) // bs - base[seq]).clamp(min=0, max=slide_width - 1)]
            rows = (blocks * bs + pos % bs) * (pos >= 0)
            return rows if end is None else rows * (pos < end)

        return full_rows, slide_rows

    def decode_host(self, chunks: tuple[SeqChunk, ...], batch: int | None = None,
                    length: int | None = None) -> list[torch.Tensor]:
        """Host index tensors of G one-token chunks, padded to `batch` rows (default G) and `length`
        full-attention keys (default: aligned(longest)): write rows [B] full and sliding, full rows
        [B, L] and which are keys [B, L], sliding rows [B, W] and which are keys [B, W]; then what
        the paged kernel reads instead of rows (PagedDecode's fields, in its order). A padding row
        writes and reads the scratch rows only (one key seen: no row without any)."""
        g, w = len(chunks), self.window
        b = g if batch is None else batch
        ends = torch.tensor([c.start + 1 for c in chunks], dtype=torch.long)  # [G]
        lf = aligned(int(max(c.start + 1 for c in chunks))) if length is None else length
        if b < g or lf < max(c.start + 1 for c in chunks):
            raise ValueError(f"{g} decode rows up to position {lf} do not fit {b} rows of {lf} keys")
        full_rows, slide_rows = self._rows_of(chunks)
        seq, pos = torch.arange(g), ends - 1
        kpos = torch.arange(lf)[None, :].expand(g, lf)  # [G, Lf]
        spos = ends[:, None] - w + torch.arange(w)[None, :]  # [G, W]
        full_seen, slide_seen = kpos < ends[:, None], spos >= 0
        out = [full_rows(seq, pos), slide_rows(seq, pos), full_rows(seq[:, None].expand_as(kpos), kpos) * full_seen,
               full_seen, slide_rows(seq[:, None].expand_as(spos), spos), slide_seen]
        pad = b - g
        if pad:
            first = torch.arange(max(lf, w)) == 0  # [*] only column 0 seen
            fill = [torch.full((pad,), self.scratch_full), torch.full((pad,), self.scratch_slide),
                    torch.full((pad, lf), self.scratch_full), first[:lf].expand(pad, lf),
                    torch.full((pad, w), self.scratch_slide), first[:w].expand(pad, w)]
            out = [torch.cat((a, p)) for a, p in zip(out, fill)]
        return out + self._paged_host(chunks, pad, self._blocks(lf), self._blocks(w) + 1)

    def _paged_host(self, chunks: tuple[SeqChunk, ...], pad: int, full_width: int, slide_width: int
                    ) -> list[torch.Tensor]:
        """PagedDecode's fields (host, int32) for one-token chunks and `pad` padding rows, whose tables
        name the scratch blocks and whose one key is position 0."""
        bs, w = self.block_size, self.window
        full, slide, base = [], [], []
        for c in chunks:
            t = self.tables[c.seq_id]
            end = c.start + 1
            full.append(t.full[:full_width] + [0] * (full_width - min(full_width, len(t.full))))
            first = max(0, end - w) // bs
            row = [t.sliding.get(i, 0) for i in range(first, min(first + slide_width, self._blocks(end)))]
            slide.append(row + [0] * (slide_width - len(row)))
            base.append(first)
        full += [[self.num_blocks] * full_width] * pad
        slide += [[self.sliding_blocks] * slide_width] * pad
        base += [0] * pad
        ends = [c.start + 1 for c in chunks] + [1] * pad
        i32 = torch.int32
        return [torch.tensor(full, dtype=i32), torch.zeros(len(ends), dtype=i32), torch.tensor(slide, dtype=i32),
                torch.tensor(base, dtype=i32), torch.tensor(ends, dtype=i32)]

    def view(self, layout: StepLayout) -> StepKV:
        """The step's index tensors, computed on the host from the tables and the chunks' integers
        (nothing is read back from the device) and copied to the device at once (batch.to_device).
        Key lengths are padded to the kernels' alignment (flash.aligned) with masked rows."""
        with host_work():  # host tensors from Python integers: no device work
            w = self.window
            full_rows, slide_rows = self._rows_of(layout.chunks)
            lengths = [c.length for c in layout.chunks]
            seq = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)], dtype=torch.long)  # [T]
            positions = torch.tensor([c.start + j for c in layout.chunks for j in range(c.length)], dtype=torch.long)
            decode = [i for i, n in enumerate(lengths) if n == 1]
            if decode:
                dec = self.decode_host(tuple(layout.chunks[i] for i in decode))
            else:
                dec = [torch.zeros(0, dtype=torch.long)] * 2 + [torch.zeros(0, 8, dtype=torch.long)] * 2 + \
                      [torch.zeros(0, w, dtype=torch.long)] * 2 + [torch.zeros(0, 1, dtype=torch.int32),
                                                                   torch.zeros(0, dtype=torch.int32)] * 2 + \
                      [torch.zeros(0, dtype=torch.int32)]
            host = [full_rows(seq, positions), slide_rows(seq, positions),
                    torch.tensor([layout.first[i] for i in decode], dtype=torch.long),  # a one-token chunk's token
                    dec[2], dec[3].bool(), dec[4], dec[5].bool(), *dec[6:]]
            prefill = [(i, c) for i, c in enumerate(layout.chunks) if c.length > 1]
            for i, c in prefill:
                index = torch.full((c.start + c.length,), i, dtype=torch.long)
                spos_c = torch.arange(c.start - (w - 1), c.start - (w - 1) + aligned(w - 1 + c.length))
                host += [full_rows(index, torch.arange(c.start + c.length)),
                         slide_rows(index[:1].expand(spos_c.shape[0]), spos_c, c.start + c.length)]
        dev = to_device(host, self.device)
        chunks = [ChunkKV(layout.first[i], c.start, c.length, dev[12 + 2 * n], dev[13 + 2 * n])
                  for n, (i, c) in enumerate(prefill)]
        return StepKV(full_write_rows=dev[0], slide_write_rows=dev[1], decode_tokens=dev[2],
                      decode_full_rows=dev[3], decode_full_bias=None if self.paged else self.bias(dev[4]),
                      decode_slide_rows=dev[5], decode_slide_bias=None if self.paged else self.bias(dev[6]), chunks=chunks,
                      decode_paged=PagedDecode(*dev[7:12]) if self.paged else None)

    def bias(self, seen: torch.Tensor) -> torch.Tensor:
        """[G, L] bool -> [G, 1, 1, L] additive mask in the cache's dtype."""
        bias = torch.zeros(seen.shape, dtype=self.k[0].dtype, device=self.device)
        return bias.masked_fill_(~seen, float("-inf"))[:, None, None, :]

    def _blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value rows [rows, nkv, d]."""
        return self.k[layer], self.v[layer]

    def write(self, layer: int, view: StepKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, nkv, d] of this step's tokens."""
        rows = view.slide_write_rows if self.cfg.is_sliding(layer) else view.full_write_rows
        self.k[layer][rows] = k
        self.v[layer][rows] = v
