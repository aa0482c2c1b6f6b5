"""Grouped expert matmuls on MXFP4 weights, in Triton: the weights stay packed (4.25 bits each) and are
decoded in registers, tile by tile, so a step reads a quarter of bf16's expert bytes.

Rows arrive sorted by expert; `ends` [E] (on the device) says where each expert's rows end. Each
program computes one tile of BLOCK_M rows of one expert against BLOCK_N output columns: it finds its
expert from the tile counts (no host read: the grid is sized for the worst case, N / BLOCK_M + E
tiles, and spare programs store nothing). Per K tile it loads x, the packed codes (element k of output
o is nibble k % 2 of byte k // 2, low nibble first) and the E8M0 scales (one per 32 inputs), decodes
e2m1 values times 2^(scale - 127) in fp32, and accumulates x @ W^T in fp32. Epilogues: the bias;
for gate_up the clamped SwiGLU of each (gate, up) column pair (gpt-oss interleaves them: gate even,
up odd), which halves the output; for down the router weight of each row.

Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (tests, in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model_shards.kernels.paged_attention import precision


@triton.jit
def _e2m1(code):
    """4-bit codes (bit 3 the sign) -> their fp32 values: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and negatives."""
    exp = (code >> 1) & 3
    mant = (code & 1).to(tl.float32)
    mag = tl.where(exp == 0, mant * 0.5, (1.0 + mant * 0.5) * tl.exp2((exp - 1).to(tl.float32)))
    return tl.where((code >> 3) & 1 == 1, -mag, mag)


@triton.jit
def _grouped_mxfp4(x_ptr, blocks_ptr, scales_ptr, bias_ptr, ends_ptr, tiles_ptr, gate_ptr, out_ptr,
                   n_rows, n_out, n_in, num_experts, limit, alpha,
                   stride_xm, stride_be, stride_se, stride_om,
                   SWIGLU: tl.constexpr, ROW_SCALE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = -1
    first_tile = 0
    for e in range(0, num_experts):  # which expert's tiles this program's index falls in
        lo = tl.load(tiles_ptr + e)
        hi = tl.load(tiles_ptr + e + 1)
        hit = (pid_m >= lo) & (pid_m < hi)
        expert = tl.where(hit, e, expert)
        first_tile = tl.where(hit, lo, first_tile)
    e = tl.maximum(expert, 0)
    row_stop = tl.where(expert >= 0, tl.load(ends_ptr + e), 0)  # a spare program (no expert) has no rows
    row_begin = tl.where(e > 0, tl.load(ends_ptr + tl.maximum(e - 1, 0)), 0)
    rows = row_begin + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < row_stop
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    col_ok = cols < n_out
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_ok = ks < n_in
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < row_stop) & k_ok[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        w_ok = col_ok[:, None] & k_ok[None, :]
        packed = tl.load(blocks_ptr + e * stride_be + cols[:, None] * (n_in // 2) + ks[None, :] // 2, mask=w_ok,
                         other=0).to(tl.int32)  # [BLOCK_N, BLOCK_K] the byte of each element
        code = (packed >> ((ks[None, :] % 2) * 4)) & 0xF
        scale = tl.load(scales_ptr + e * stride_se + cols[:, None] * (n_in // 32) + ks[None, :] // 32, mask=w_ok,
                        other=127).to(tl.int32)
        w = _e2m1(code) * tl.exp2((scale - 127).to(tl.float32))  # [BLOCK_N, BLOCK_K]
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    acc += tl.load(bias_ptr + e * n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:  # columns interleave gate (even) and up (odd): one output per pair
        gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N // 2, 2]))
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        result = gate * tl.sigmoid(alpha * gate) * (up + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + rows[:, None] * stride_om + out_cols[None, :], result,
                 mask=row_ok[:, None] & (out_cols < n_out // 2)[None, :])
    else:
        if ROW_SCALE:
            acc = acc * tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def grouped_mxfp4(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor,
                  ends: torch.Tensor, swiglu: tuple[float, float] | None = None, row_scale: torch.Tensor | None = None,
                  block_m: int = 16, block_n: int = 32, block_k: int = 64) -> torch.Tensor:
    """x [N, K] rows sorted by expert, ends [E] int32 end row of each expert's rows (on the device),
    blocks [E, OUT, K/32, 16] uint8, scales [E, OUT, K/32] uint8, bias [E, OUT] -> fp32 [N, OUT], or
    with `swiglu` (limit, alpha) [N, OUT/2] = SwiGLU of each (gate, up) column pair, or with
    `row_scale` [N] each row times its weight. Nothing is read on the host."""
    n, k_in = x.shape
    experts, n_out = blocks.shape[0], blocks.shape[1]
    if k_in % 32 or blocks.shape[2] * 32 != k_in or (swiglu is not None and (n_out % 2 or block_n % 2)):
        raise ValueError(f"MXFP4 shapes disagree: x {tuple(x.shape)}, blocks {tuple(blocks.shape)}")
    counts = torch.diff(ends.to(torch.int64), prepend=ends.new_zeros(1).to(torch.int64))  # [E]
    tiles = torch.zeros(experts + 1, dtype=torch.int32, device=x.device)
    tiles[1:] = torch.cumsum((counts + block_m - 1) // block_m, 0)
    out = torch.empty(n, n_out // 2 if swiglu else n_out, dtype=torch.float32, device=x.device)
    limit, alpha = swiglu if swiglu is not None else (0.0, 0.0)
    grid = (triton.cdiv(n, block_m) + experts, triton.cdiv(n_out, block_n))
    x = x.contiguous()
    _grouped_mxfp4[grid](x, blocks, scales, bias, ends, tiles, row_scale if row_scale is not None else x, out,
                         n, n_out, k_in, experts, limit, alpha,
                         x.stride(0), blocks.stride(0), scales.stride(0), out.stride(0),
                         SWIGLU=swiglu is not None, ROW_SCALE=row_scale is not None,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision(x.dtype))
    return out
