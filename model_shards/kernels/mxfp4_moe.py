"""Grouped expert matmuls on MXFP4 weights, in Triton: the weights stay packed (4.25 bits each) and are
decoded in registers, tile by tile, so a step reads a quarter of bf16's expert bytes.

Rows arrive sorted by expert; `ends` [E] (on the device) says where each expert's rows end. Each
program computes one tile of BLOCK_M rows of one expert against BLOCK_N output columns: it finds its
expert by counting each expert's tiles from `ends` (no host read: the grid is sized for the worst
case, N / BLOCK_M + E tiles, and spare programs store nothing). The sorted rows may be read in place
through `order` (sorted position -> assignment) and each assignment's row of x, and the outputs
stored back at their assignment's position: no gathered copy of x and no scatter afterwards. Per K tile it loads x, the packed codes (element k of output
o is nibble k % 2 of byte k // 2, low nibble first) and the E8M0 scales (one per 32 inputs), decodes
e2m1 values times 2^(scale - 127) in fp32, and accumulates x @ W^T in fp32. Epilogues: the bias;
for gate_up the clamped SwiGLU of each (gate, up) column pair (gpt-oss interleaves them: gate even,
up odd), which halves the output; for down the router weight of each row.

The same kernel multiplies dense expert weights [E, OUT, K] (`grouped_dense`): one path for both.

Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (tests, in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model_shards.kernels.paged_attention import precision
from model_shards.syncs import kernel_launch


@triton.jit
def _e2m1(code):
    """4-bit codes (bit 3 the sign) -> their fp32 values: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives."""
    exp = (code >> 1) & 3
    mant = (code & 1).to(tl.float32)
    mag = tl.where(exp == 0, mant * 0.5, (1.0 + mant * 0.5) * tl.exp2((exp - 1).to(tl.float32)))
    return tl.where((code >> 3) & 1 == 1, -mag, mag)


@triton.jit
def _grouped(x_ptr, w_ptr, scales_ptr, bias_ptr, ends_ptr, order_ptr, token_ptr, gate_ptr, out_ptr,
             n_out, n_in, num_experts, limit, alpha, stride_xm, stride_we, stride_se, stride_om,
             MXFP4: tl.constexpr, SWIGLU: tl.constexpr, ROW_SCALE: tl.constexpr, GATHER: tl.constexpr,
             TOKEN_DIV: tl.constexpr, SCATTER: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = -1
    first_tile = 0
    row_begin = 0
    row_stop = 0
    tiles = 0
    prev_end = 0
    for e in range(0, num_experts):  # which expert's tiles this program's index falls in
        end = tl.load(ends_ptr + e)
        count = (end - prev_end + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tiles) & (pid_m < tiles + count)
        expert = tl.where(hit, e, expert)
        first_tile = tl.where(hit, tiles, first_tile)
        row_begin = tl.where(hit, prev_end, row_begin)
        row_stop = tl.where(hit, end, row_stop)  # a spare program (no expert) keeps 0 rows
        tiles += count
        prev_end = end
    e = tl.maximum(expert, 0)
    rows = row_begin + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] sorted positions
    row_ok = rows < row_stop
    assignment = rows
    if GATHER or SCATTER:
        assignment = tl.load(order_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # [BLOCK_M]
    x_rows = rows.to(tl.int64)
    if GATHER == 1:  # each assignment's row of x from token_index
        x_rows = tl.load(token_ptr + assignment, mask=row_ok, other=0).to(tl.int64)
    if GATHER == 2:  # assignment a is token a // TOKEN_DIV's
        x_rows = assignment // TOKEN_DIV
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    col_ok = cols < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_stop = tl.where(row_begin + (pid_m - first_tile) * BLOCK_M < row_stop, n_in, 0)  # spare programs skip the loop
    for k0 in range(0, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = ks < n_in
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        w_ok = col_ok[:, None] & k_ok[None, :]
        if MXFP4:
            packed = tl.load(w_ptr + e * stride_we + cols[:, None] * (n_in // 2) + ks[None, :] // 2, mask=w_ok,
                             other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K] the byte of each element
            code = (packed >> ((ks[None, :] % 2) * 4)) & 0xF
            scale = tl.load(scales_ptr + e * stride_se + cols[:, None] * (n_in // 32) + ks[None, :] // 32,
                            mask=w_ok, other=127).to(tl.int32)
            w = _e2m1(code) * tl.exp2((scale - 127).to(tl.float32))  # [BLOCK_N, BLOCK_K]
        else:
            w = tl.load(w_ptr + e * stride_we + cols[:, None] * n_in + ks[None, :], mask=w_ok,
                        other=0.0).to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    acc += tl.load(bias_ptr + e * n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = rows.to(tl.int64)
    if SCATTER:
        out_rows = assignment
    if SWIGLU:  # columns interleave gate (even) and up (odd): one output per pair
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        result = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + out_rows[:, None] * stride_om + out_cols[None, :], result.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (out_cols < n_out // 2)[None, :])
    else:
        if ROW_SCALE:
            acc = acc * tl.load(gate_ptr + assignment, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


def _launch(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor,
            ends: torch.Tensor, n_rows: int, swiglu: tuple[float, float] | None, row_scale: torch.Tensor | None,
            order: torch.Tensor | None, gather: bool, token_index: torch.Tensor | None, token_div: int,
            scatter: bool, out: torch.Tensor | None, out_dtype: torch.dtype, block_m: int, block_n: int, block_k: int) -> torch.Tensor:
    experts, n_out, k_in = weight.shape[0], weight.shape[1], x.shape[1]
    if swiglu is not None and (n_out % 2 or block_n % 2):
        raise ValueError(f"SwiGLU needs an even output width, got {n_out}")
    if order is None and (gather or scatter):
        raise ValueError("gathering or scattering rows needs `order`")
    if out is None:
        out = torch.empty(n_rows, n_out // 2 if swiglu else n_out, dtype=out_dtype, device=x.device)
    if n_rows == 0:
        return out
    limit, alpha = swiglu if swiglu is not None else (0.0, 0.0)
    mode = 0 if not gather else (1 if token_index is not None else 2)
    grid = (triton.cdiv(n_rows, block_m) + experts, triton.cdiv(n_out, block_n))
    with kernel_launch("grouped_mxfp4" if scales is not None else "grouped_dense"):
        _grouped[grid](x, weight, scales if scales is not None else weight, bias, ends,
                       order if order is not None else ends, token_index if token_index is not None else ends,
                       row_scale if row_scale is not None else x, out,
                       n_out, k_in, experts, limit, alpha,
                       x.stride(0), weight.stride(0), scales.stride(0) if scales is not None else 0, out.stride(0),
                       MXFP4=scales is not None, SWIGLU=swiglu is not None, ROW_SCALE=row_scale is not None,
                       GATHER=mode, TOKEN_DIV=token_div, SCATTER=scatter,
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision(x.dtype))
    return out


def grouped_mxfp4(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                  ends: torch.Tensor, swiglu: tuple[float, float] | None = None, row_scale: torch.Tensor | None = None,
                  order: torch.Tensor | None = None, gather: bool = False, token_index: torch.Tensor | None = None,
                  token_div: int = 1, scatter: bool = False, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  block_m: int = 16, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """Grouped x @ W_e^T + b_e on packed weights: blocks [E, OUT, K/32, 16] uint8, scales [E, OUT, K/32]
    uint8, bias [E, OUT], ends [E] int32 end of each expert's rows (sorted positions, on the device).

    Rows: x [N, K] sorted by expert, or with `gather` and `order` [N] (sorted position -> assignment)
    the row of x of each sorted position is token_index[assignment] (token_index [N]), or
    assignment // token_div.
    -> out [N, OUT] (out_dtype, default fp32); with `swiglu` (limit, alpha) [N, OUT/2] = SwiGLU of each
    (gate, up) column pair; with `row_scale` [N] (by assignment) each row times its weight; `scatter`:
    row p is stored at order[p] (out given: rows of groups past ends[-1] are left as they are).
    Nothing is read on the host."""
    k_in = x.shape[1]
    if k_in % 32 or blocks.shape[2] * 32 != k_in:
        raise ValueError(f"MXFP4 shapes disagree: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}")
    n_rows = order.shape[0] if order is not None else x.shape[0]
    return _launch(x, blocks, scales, bias, ends, n_rows, swiglu, row_scale, order, gather, token_index, token_div, scatter,
                   out, out_dtype, block_m, block_n, block_k)


def grouped_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ends: torch.Tensor,
                  swiglu: tuple[float, float] | None = None, row_scale: torch.Tensor | None = None,
                  order: torch.Tensor | None = None, gather: bool = False, token_index: torch.Tensor | None = None,
                  token_div: int = 1, scatter: bool = False, out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                  block_m: int = 16, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """grouped_mxfp4 on dense weights [E, OUT, K] (contiguous in K)."""
    if weight.shape[2] != x.shape[1] or weight.stride(2) != 1 or weight.stride(1) != x.shape[1]:
        raise ValueError(f"dense expert shapes disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    n_rows = order.shape[0] if order is not None else x.shape[0]
    return _launch(x, weight, None, bias, ends, n_rows, swiglu, row_scale, order, gather, token_index, token_div, scatter,
                   out, out_dtype, block_m, block_n, block_k)
