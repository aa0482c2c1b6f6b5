"""Paged decode attention with sinks and the sliding window, in Triton.

One program per (sequence, KV head) computes that head's group of query heads (GQA: gpt-oss has 8
query heads per KV head) against the sequence's keys, read in place from the paged cache through its
block table: no gather into a padded buffer. Keys arrive in tiles of BLOCK_N positions; the softmax
runs online (running maximum, running sum, rescaled accumulator) in fp32, and the sink logit joins
the denominator at the end: out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink - m)), the
same as the reference (attention.sdpa_with_sinks). Lengths and tables are device tensors: nothing
is read on the host, and the launch is the same for every step of a batch size (CUDA graphs).

Long contexts at small batches leave most of a GPU idle with one program per (sequence, KV head):
the keys are then split over several programs (flash-decoding), each writing its running max, sum
and unnormalised output, and a second kernel merges them with the sink. The number of splits comes
from host-known shapes (the table's width), so the launch stays fixed for a graph.

Sliding layers keep only the blocks inside the window: their table starts at a block index `base`
per sequence (kv_cache.py), and only positions [end - window, end) are read.

Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the tests run it; the interpreter
mishandles bf16 dots, so tests use fp32). Products run in fp32 (`precision`: full fp32 for float32
models, tf32 for bf16 ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model_shards.syncs import kernel_launch


@triton.jit
def _tiles(q, k_ptr, v_ptr, table_ptr, g, h, base, lo, end, start, stop, table_width, scale,
           stride_kr, stride_kh, stride_tg,
           GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of q [GQ, D] over the keys [lo, end) that fall in tiles [start, stop) ->
    (running max [GQ], sum of exponentials [GQ], unnormalised output [GQ, D]), all fp32."""
    dims = tl.arange(0, D)
    m = tl.full([GQ], float("-inf"), tl.float32)
    s_sum = tl.zeros([GQ], tl.float32)
    acc = tl.zeros([GQ, D], tl.float32)
    for tile in range(start, stop, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        seen = (pos >= lo) & (pos < end)
        entry = tl.minimum(tl.maximum(pos // BS - base, 0), table_width - 1)
        block = tl.load(table_ptr + g * stride_tg + entry, mask=seen, other=0)
        rows = block.to(tl.int64) * BS + pos % BS  # [BLOCK_N] rows of the cache
        k = tl.load(k_ptr + rows[:, None] * stride_kr + h * stride_kh + dims[None, :], mask=seen[:, None],
                    other=0.0).to(tl.float32)  # [BLOCK_N, D]
        v = tl.load(v_ptr + rows[:, None] * stride_kr + h * stride_kh + dims[None, :], mask=seen[:, None],
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [GQ, BLOCK_N]
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a split whose tiles saw no key yet keeps m = -inf: exp(-inf - -inf) would be nan
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        p = tl.where(seen[None, :], tl.exp(s - m_new[:, None]), 0.0)
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    return m, s_sum, acc


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, base_ptr, end_ptr, sink_ptr, out_ptr, part_ptr,
                  scale, window, table_width,
                  stride_qg, stride_qh, stride_kr, stride_kh, stride_tg, stride_og, stride_oh,
                  GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    g = tl.program_id(0)  # the sequence
    h = tl.program_id(1)  # its KV head
    split = tl.program_id(2)  # its share of the keys (flash-decoding), when SPLITS > 1
    heads = h * GQ + tl.arange(0, GQ)  # [GQ] the query heads of this KV head
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + g * stride_qg + heads[:, None] * stride_qh + dims[None, :]).to(tl.float32)  # [GQ, D]
    end = tl.load(end_ptr + g)  # keys at positions [lo, end)
    base = tl.load(base_ptr + g)  # the block index of the table's first entry
    lo = tl.maximum(end - window, 0)
    first = (lo // BLOCK_N) * BLOCK_N  # tiles start aligned; positions before `lo` are masked
    share = tl.cdiv(tl.cdiv(end - first, SPLITS), BLOCK_N) * BLOCK_N  # each split's whole tiles
    start = first + split * share
    stop = tl.minimum(start + share, end)
    m, s_sum, acc = _tiles(q, k_ptr, v_ptr, table_ptr, g, h, base, lo, end, start, stop, table_width, scale,
                           stride_kr, stride_kh, stride_tg, GQ, D, BS, BLOCK_N, PRECISION)
    if SPLITS == 1:
        sink = tl.load(sink_ptr + heads).to(tl.float32)  # [GQ]
        out = acc / (s_sum + tl.exp(sink - m))[:, None]
        tl.store(out_ptr + g * stride_og + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty))
    else:  # partials [G, nq, SPLITS, D + 2]: the output, then the max and the sum
        row = (g * tl.num_programs(1) * GQ + heads) * SPLITS + split  # [GQ]
        tl.store(part_ptr + row[:, None] * (D + 2) + dims[None, :], acc)
        tl.store(part_ptr + row * (D + 2) + D, m)
        tl.store(part_ptr + row * (D + 2) + D + 1, s_sum)


@triton.jit
def _merge_splits(part_ptr, sink_ptr, out_ptr, nq, stride_og, stride_oh,
                  D: tl.constexpr, SPLITS: tl.constexpr):
    g = tl.program_id(0)
    head = tl.program_id(1)
    dims = tl.arange(0, D)
    split = tl.arange(0, SPLITS)
    row = (g * nq + head) * SPLITS + split  # [SPLITS]
    m = tl.load(part_ptr + row * (D + 2) + D)  # [SPLITS] (-inf where a split saw no key)
    s_sum = tl.load(part_ptr + row * (D + 2) + D + 1)
    acc = tl.load(part_ptr + row[:, None] * (D + 2) + dims[None, :])  # [SPLITS, D]
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))  # [SPLITS]
    total = tl.sum(s_sum * w, axis=0) + tl.exp(tl.load(sink_ptr + head).to(tl.float32) - top)
    out = tl.sum(acc * w[:, None], axis=0) / total  # [D]
    tl.store(out_ptr + g * stride_og + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 models keep full fp32 products ("ieee"); bf16 models take
    the tensor cores' tf32, more precise than their own inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Split the keys (flash-decoding) when the grid would otherwise leave most of a GPU's multiprocessors
# idle: a long context at a small batch. Enough programs for a large GPU; each split keeps at least
# MIN_SPLIT_KEYS keys so that its partial's write and the merge stay small beside its reads.
TARGET_PROGRAMS = 256
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 32


def choose_splits(programs: int, keys: int) -> int:
    """Splits of each (sequence, KV head)'s keys for `programs` of them over at most `keys` keys (a
    host-known bound: the table's width): a power of two, 1 when the grid is full or keys few."""
    want = min(MAX_SPLITS, -(-TARGET_PROGRAMS // max(1, programs)), keys // MIN_SPLIT_KEYS)
    return 1 << (max(1, want).bit_length() - 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                           base: torch.Tensor, ends: torch.Tensor, sinks: torch.Tensor, scale: float,
                           block_size: int, window: int | None, block_n: int = 16,
                           splits: int | None = None) -> torch.Tensor:
    """q [G, nq, d] one query per sequence; k_cache/v_cache [rows, nkv, d] (block b: rows [b*bs, (b+1)*bs));
    table [G, W] int block ids, entry j holding logical block base[g] + j; ends [G] the sequence's key
    count (its query is at ends - 1); sinks [nq] fp32; window: the last `window` positions only (None:
    all) -> [G, nq, d] in q's dtype. Every key a sequence reads must be in its table. `splits`: how
    many programs share one sequence's keys (a power of two; default choose_splits), their partials
    merged by a second kernel."""
    g, nq, d = q.shape
    nkv = k_cache.shape[1]
    if nq % nkv or d & (d - 1) or (nq // nkv) & (nq // nkv - 1):
        raise ValueError("needs a power-of-two head dim and query heads per KV head")
    keys = table.shape[1] * block_size if window is None else min(window, table.shape[1] * block_size)
    splits = splits if splits is not None else choose_splits(g * nkv, keys)
    if splits & (splits - 1):
        raise ValueError(f"splits must be a power of two, got {splits}")
    q, table = q.contiguous(), table.contiguous()
    out = torch.empty_like(q)
    part = torch.empty(g * nq * splits * (d + 2) if splits > 1 else 1, dtype=torch.float32, device=q.device)
    limit = window if window is not None else 1 << 30
    with kernel_launch("paged_decode"):
        _paged_decode[(g, nkv, splits)](q, k_cache, v_cache, table, base, ends, sinks, out, part, scale, limit,
                                        table.shape[1], q.stride(0), q.stride(1), k_cache.stride(0),
                                        k_cache.stride(1), table.stride(0), out.stride(0), out.stride(1),
                                        GQ=nq // nkv, D=d, BS=block_size, BLOCK_N=block_n, SPLITS=splits,
                                        PRECISION=precision(q.dtype))
    if splits > 1:
        with kernel_launch("merge_splits"):
            _merge_splits[(g, nq)](part, sinks, out, nq, out.stride(0), out.stride(1), D=d, SPLITS=splits)
    return out
