"""Small fused kernels of a layer, in Triton: each replaces several of PyTorch's launches.

- `add_rms_norm`: the residual add and the next RMSNorm in one pass over the row (norm.py's math:
  the weight multiplies in fp32 before the cast; the sum is rounded to the model dtype first, as
  `x + delta` is).
- `rope_write`: RoPE of the step's q and k (rope.py's half-split rotation, in fp32) with k and v
  written into their cache rows: q comes back, k and v go only to the cache.
- `route_topk`: the router's logits, top-k and the softmax over those k (moe.route), with the
  routed-token counts (the load balancer's) added in place.
- `sort_assignments`: a decode-sized step's assignments grouped by expert (stable, as
  `argsort(stable=True)`) and each group's end, in one program: no host read and no sort library.

Each wrapper launches one kernel (syncs.kernel_launch counts it). Runs on CUDA, and on the CPU under
TRITON_INTERPRET=1 (the tests, in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model_shards.syncs import kernel_launch

# sort_assignments' one program holds an [experts, assignments] table: bound its size (larger steps,
# prefills, sort with torch)
SORT_MAX_CELLS = 1 << 16


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@triton.jit
def _add_rms_norm(x_ptr, d_ptr, w_ptr, sum_ptr, out_ptr, n_cols, eps,
                  stride_x, stride_d, stride_s, stride_o, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)  # rounded like `x + delta` in the model dtype
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * (xf * inv)).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], delta [T, H] or None, weight [H] fp32 -> (x + delta [T, H], rms_norm(x + delta) [T, H]),
    both in x's dtype (without delta: x itself and its norm)."""
    t, h = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else x
    d = delta if delta is not None else x
    if t:
        with kernel_launch("add_rms_norm"):
            _add_rms_norm[(t,)](x, d, weight, total, out, h, eps, x.stride(0), d.stride(0), total.stride(0),
                                out.stride(0), HAS_DELTA=delta is not None, BLOCK=_pow2(h))
    return total, out


@triton.jit
def _rope_write(qkv_ptr, cos_ptr, sin_ptr, rows_ptr, q_ptr, k_ptr, v_ptr,
                stride_t, stride_c, stride_kr, stride_kh, stride_qt, stride_qh,
                NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
                BQ: tl.constexpr, BKV: tl.constexpr, BH: tl.constexpr):
    t = tl.program_id(0)
    j = tl.arange(0, BH)  # [BH] the first half's dimensions
    j_ok = j < HALF
    c = tl.load(cos_ptr + t * stride_c + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + t * stride_c + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    base = qkv_ptr + t * stride_t
    hq = tl.arange(0, BQ)
    q_ok = (hq < NQ)[:, None] & j_ok[None, :]
    src = base + hq[:, None] * (2 * HALF) + j[None, :]  # [BQ, BH] q heads are the first NQ * d columns
    x1 = tl.load(src, mask=q_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=q_ok, other=0.0).to(tl.float32)
    dst = q_ptr + t * stride_qt + hq[:, None] * stride_qh + j[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(q_ptr.dtype.element_ty), mask=q_ok)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(q_ptr.dtype.element_ty), mask=q_ok)
    row = tl.load(rows_ptr + t).to(tl.int64)  # the cache row of this token
    hk = tl.arange(0, BKV)
    k_ok = (hk < NKV)[:, None] & j_ok[None, :]
    src = base + (NQ + hk[:, None]) * (2 * HALF) + j[None, :]
    x1 = tl.load(src, mask=k_ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=k_ok, other=0.0).to(tl.float32)
    dst = k_ptr + row * stride_kr + hk[:, None] * stride_kh + j[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=k_ok)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=k_ok)
    src = base + (NQ + NKV + hk[:, None]) * (2 * HALF) + j[None, :]
    dst = v_ptr + row * stride_kr + hk[:, None] * stride_kh + j[None, :]
    tl.store(dst, tl.load(src, mask=k_ok, other=0.0), mask=k_ok)
    tl.store(dst + HALF, tl.load(src + HALF, mask=k_ok, other=0.0), mask=k_ok)


def rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, num_heads: int) -> torch.Tensor:
    """qkv [T, (nq + 2 nkv) d] (q heads, k heads, v heads), cos/sin [T, d/2], rows [T] cache rows,
    k_cache/v_cache [rows, nkv, d] -> q [T, nq, d] after RoPE; k (after RoPE) and v are written to
    their rows of the caches."""
    t = qkv.shape[0]
    nkv, d = k_cache.shape[1], k_cache.shape[2]
    if qkv.shape[1] != (num_heads + 2 * nkv) * d or qkv.stride(1) != 1 or k_cache.stride(2) != 1:
        raise ValueError(f"rope_write: qkv {tuple(qkv.shape)} does not hold {num_heads} + 2 x {nkv} heads of {d}")
    q = qkv.new_empty(t, num_heads, d)
    if t:
        with kernel_launch("rope_write"):
            _rope_write[(t,)](qkv, cos, sin, rows, q, k_cache, v_cache, qkv.stride(0), cos.stride(0),
                              k_cache.stride(0), k_cache.stride(1), q.stride(0), q.stride(1),
                              NQ=num_heads, NKV=nkv, HALF=d // 2, BQ=_pow2(num_heads), BKV=_pow2(nkv),
                              BH=_pow2(d // 2))
    return q


@triton.jit
def _route_topk(t_ptr, w_ptr, b_ptr, experts_ptr, gates_ptr, counts_ptr, real_ptr, n_experts, n_in,
                stride_t, stride_w, K: tl.constexpr, BK: tl.constexpr, COUNT: tl.constexpr, REAL: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < n_experts
    acc = tl.zeros([BLOCK_E], tl.float32)
    for h0 in range(0, n_in, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = h < n_in
        x = tl.load(t_ptr + row * stride_t + h, mask=h_ok, other=0.0).to(tl.float32)  # [BLOCK_H]
        w = tl.load(w_ptr + e[:, None] * stride_w + h[None, :], mask=e_ok[:, None] & h_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_E, BLOCK_H]
        acc += tl.sum(w * x[None, :], axis=1)
    acc += tl.load(b_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
    logits = acc.to(gates_ptr.dtype.element_ty).to(tl.float32)  # the linear's output is in the model dtype
    logits = tl.where(e_ok, logits, float("-inf"))
    slot = tl.arange(0, BK)
    top = tl.full([BK], float("-inf"), tl.float32)
    ids = tl.zeros([BK], tl.int64)
    for k in range(K):  # the largest, then the next: ties to the lower expert id
        best = tl.max(logits, axis=0)
        pick = tl.min(tl.where(logits == best, e, BLOCK_E), axis=0)
        top = tl.where(slot == k, best, top)
        ids = tl.where(slot == k, pick.to(tl.int64), ids)
        logits = tl.where(e == pick, float("-inf"), logits)
    p = tl.exp(top - tl.max(top, axis=0))
    p = p / tl.sum(p, axis=0)
    ok = slot < K
    tl.store(experts_ptr + row * K + slot, ids, mask=ok)
    tl.store(gates_ptr + row * K + slot, p.to(gates_ptr.dtype.element_ty), mask=ok)
    if COUNT:
        add = tl.full([BK], 1, tl.int64)
        if REAL:
            add = add * tl.load(real_ptr + row).to(tl.int64)
        tl.atomic_add(counts_ptr + ids, add, mask=ok)


def route_topk(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int, counts: torch.Tensor | None = None,
               real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.route in one kernel: t [T, H], weight [E, H], bias [E] -> experts [T, K] long, gates [T, K]
    in t's dtype (softmax of the top-k logits, largest first). `counts` [E] long, when given, grows
    by one per routed token (by `real` [T] per token, when given: padding rows add 0)."""
    n, h = t.shape
    e = weight.shape[0]
    experts = torch.empty(n, k, dtype=torch.long, device=t.device)
    gates = torch.empty(n, k, dtype=t.dtype, device=t.device)
    if n:
        block_e = _pow2(e)
        with kernel_launch("route_topk"):
            _route_topk[(n,)](t, weight, bias, experts, gates, counts if counts is not None else experts,
                              real if real is not None else experts, e, h, t.stride(0), weight.stride(0),
                              K=k, BK=_pow2(k), COUNT=counts is not None, REAL=real is not None,
                              BLOCK_E=block_e, BLOCK_H=max(16, min(_pow2(h), 8192 // block_e)))
    return experts, gates


@triton.jit
def _sort_assignments(ids_ptr, order_ptr, ends_ptr, n, groups, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    i = tl.arange(0, BLOCK_N)
    i_ok = i < n
    ids = tl.load(ids_ptr + i, mask=i_ok, other=-1).to(tl.int32)  # [BLOCK_N]
    g = tl.arange(0, BLOCK_G)
    hit = (ids[None, :] == g[:, None]) & i_ok[None, :]  # [BLOCK_G, BLOCK_N] one-hot of each assignment's group
    hits = hit.to(tl.int32)
    counts = tl.sum(hits, axis=1)  # [BLOCK_G]
    ends = tl.cumsum(counts, axis=0)
    before = tl.cumsum(hits, axis=1) - hits  # earlier assignments of the same group
    rank = tl.sum(tl.where(hit, before + (ends - counts)[:, None], 0), axis=0)  # [BLOCK_N] sorted position
    tl.store(order_ptr + rank, i, mask=i_ok)
    tl.store(ends_ptr + g, ends, mask=g < groups)


def sorts_here(n: int, groups: int) -> bool:
    """Whether sort_assignments' single program takes n assignments over `groups` groups."""
    return _pow2(n) * _pow2(groups) <= SORT_MAX_CELLS


def sort_assignments(ids: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N] in [0, groups) -> (order [N] int32: the assignments grouped by id, in their order within
    a group (a stable argsort), ends [groups] int32: the end of each group in `order`)."""
    n = ids.shape[0]
    order = torch.empty(n, dtype=torch.int32, device=ids.device)
    ends = torch.empty(groups, dtype=torch.int32, device=ids.device)
    with kernel_launch("sort_assignments"):
        _sort_assignments[(1,)](ids, order, ends, n, groups, BLOCK_N=_pow2(n), BLOCK_G=_pow2(groups))
    return order, ends
