"""Each Triton kernel's achieved bandwidth, for scripts/gpu-check.sh: a decode step is bound by the bytes
it reads (weights and KV), so a kernel's bytes over its time, against the device's copy bandwidth,
says how close it runs to the limit. Shapes are gpt-oss-20b's (or the preset's) at decode batch sizes.

Like device_check it imports torch and model_shards only. On the CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1): the numbers then mean nothing, but the harness is tested.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from model_shards import mxfp4
from model_shards.config import GptOssConfig


@dataclass
class KernelRow:
    kernel: str
    shape: str  # what was run, in words
    us: float  # median time of one launch
    gb_per_s: float  # bytes read and written over that time


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def time_launch(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median seconds of one call (after one warm-up call, which compiles)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_rows(cfg: GptOssConfig, dtype: torch.dtype, device: torch.device, batches: list[int], context: int,
                reps: int = 20) -> list[KernelRow]:
    """Paged attention (one program per sequence and KV head, and split), the grouped expert matmul
    (MXFP4 and dense, gate_up with its SwiGLU), the router and the norm, at each batch size."""
    from model_shards.kernels.fused import add_rms_norm, route_topk
    from model_shards.kernels.mxfp4_moe import grouped_dense, grouped_mxfp4
    from model_shards.kernels.paged_attention import choose_splits, paged_decode_attention

    gen = torch.Generator(device=device).manual_seed(0)
    h, nq, nkv, d, bs = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 16
    e, k, inter = cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    rows: list[KernelRow] = []

    def add(kernel: str, shape: str, fn: Callable[[], object], nbytes: int) -> None:
        seconds = time_launch(fn, device, reps)
        rows.append(KernelRow(kernel, shape, seconds * 1e6, nbytes / seconds / 1e9))

    up_blocks, up_scales = mxfp4.quantize(torch.randn(e, 2 * inter, h, generator=gen, device=device) / h ** 0.5)
    up_dense = randn(e, 2 * inter, h)
    up_bias = randn(e, 2 * inter)
    router, router_bias, norm_w = randn(e, h), randn(e), torch.ones(h, device=device)
    for b in batches:
        blocks = b * -(-context // bs)
        k_cache, v_cache = randn(blocks * bs, nkv, d), randn(blocks * bs, nkv, d)
        table = torch.arange(blocks, device=device, dtype=torch.int32).view(b, -1)
        zeros = torch.zeros(b, device=device, dtype=torch.int32)
        ends = torch.full((b,), context, device=device, dtype=torch.int32)
        q, sinks = randn(b, nq, d), torch.zeros(nq, device=device)
        kv_bytes = _nbytes(k_cache, v_cache) + 2 * _nbytes(q)
        for splits in sorted({1, choose_splits(b * nkv, context)}):
            add("paged_decode", f"batch {b}, {context} keys, {splits} split(s)",
                lambda s=splits: paged_decode_attention(q, k_cache, v_cache, table, zeros, ends, sinks, d ** -0.5,
                                                        bs, None, splits=s), kv_bytes)
        x = randn(b * k, h)  # the step's assignments, spread evenly over the experts
        counts = torch.bincount(torch.arange(b * k, device=device) % e, minlength=e)
        end_rows = counts.cumsum(0).to(torch.int32)
        used = int((counts > 0).sum())  # experts whose weights are read
        act = torch.empty(b * k, inter, device=device)
        add("grouped_mxfp4", f"gate_up+SwiGLU, {b * k} rows over {used} experts",
            lambda: grouped_mxfp4(x, up_blocks, up_scales, up_bias, end_rows, swiglu=(7.0, 1.702), out=act),
            _nbytes(up_blocks[:used], up_scales[:used], x, act))
        add("grouped_dense", f"gate_up+SwiGLU, {b * k} rows over {used} experts",
            lambda: grouped_dense(x, up_dense, up_bias, end_rows, swiglu=(7.0, 1.702), out=act),
            _nbytes(up_dense[:used], x, act))
        t = randn(b, h)
        add("route_topk", f"{b} tokens, {e} experts", lambda: route_topk(t, router, router_bias, k),
            _nbytes(router, t))
        add("add_rms_norm", f"{b} x {h}", lambda: add_rms_norm(t, t, norm_w, 1e-5), 4 * _nbytes(t))
    return rows
