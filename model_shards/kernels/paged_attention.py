"""Paged decode attention with sinks and the sliding window, in Triton.

One program per (sequence, KV head) computes that head's group of query heads (GQA: gpt-oss has 8
query heads per KV head) against the sequence's keys, read in place from the paged cache through its
block table: no gather into a padded buffer. Keys arrive in tiles of BLOCK_N positions; the softmax
runs online (running maximum, running sum, rescaled accumulator) in fp32, and the sink logit joins
the denominator at the end: out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink - m)), the
same as the reference (attention.sdpa_with_sinks). Lengths and tables are device tensors: nothing
is read on the host, and the launch is the same for every step of a batch size (CUDA graphs).

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


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, base_ptr, end_ptr, sink_ptr, out_ptr,
                  scale, window, table_width,
                  stride_qg, stride_qh, stride_kr, stride_kh, stride_tg, stride_og, stride_oh,
                  GQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr):
    g = tl.program_id(0)  # the sequence
    h = tl.program_id(1)  # its KV head
    heads = h * GQ + tl.arange(0, GQ)  # [GQ] the query heads of this KV head
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + g * stride_qg + heads[:, None] * stride_qh + dims[None, :]).to(tl.float32)  # [GQ, D]
    end = tl.load(end_ptr + g)  # keys at positions [first, end)
    base = tl.load(base_ptr + g)  # the block index of the table's first entry
    first = tl.maximum(end - window, 0)
    first = (first // BLOCK_N) * BLOCK_N  # tiles start aligned; positions before `first` are masked below
    m = tl.full([GQ], float("-inf"), tl.float32)
    s_sum = tl.zeros([GQ], tl.float32)
    acc = tl.zeros([GQ, D], tl.float32)
    lo = tl.maximum(end - window, 0)
    for start in range(first, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
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
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m = m_new
    sink = tl.load(sink_ptr + heads).to(tl.float32)  # [GQ]
    out = acc / (s_sum + tl.exp(sink - m))[:, None]
    tl.store(out_ptr + g * stride_og + heads[:, None] * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty))


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: float32 models keep full fp32 products ("ieee"); bf16 models take
    the tensor cores' tf32, more precise than their own inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                           base: torch.Tensor, ends: torch.Tensor, sinks: torch.Tensor, scale: float,
                           block_size: int, window: int | None, block_n: int = 16) -> torch.Tensor:
    """q [G, nq, d] one query per sequence; k_cache/v_cache [rows, nkv, d] (block b: rows [b*bs, (b+1)*bs));
    table [G, W] int block ids, entry j holding logical block base[g] + j; ends [G] the sequence's key
    count (its query is at ends - 1); sinks [nq] fp32; window: the last `window` positions only (None:
    all) -> [G, nq, d] in q's dtype. Every key a sequence reads must be in its table."""
    g, nq, d = q.shape
    nkv = k_cache.shape[1]
    if nq % nkv or d & (d - 1) or (nq // nkv) & (nq // nkv - 1):
        raise ValueError("needs a power-of-two head dim and query heads per KV head")
    q, table = q.contiguous(), table.contiguous()
    out = torch.empty_like(q)
    limit = window if window is not None else 1 << 30
    _paged_decode[(g, nkv)](q, k_cache, v_cache, table, base, ends, sinks, out, scale, limit, table.shape[1],
                            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), table.stride(0),
                            out.stride(0), out.stride(1),
                            GQ=nq // nkv, D=d, BS=block_size, BLOCK_N=block_n, PRECISION=precision(q.dtype))
    return out
