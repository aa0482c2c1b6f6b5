"""Grouped-query attention with learned sinks and the per-layer sliding window: the block the model
runs (through the fused kernels of flash.py), and the plain reference it is tested against.

Sinks: one learned logit per query head joins the softmax denominator as an extra column, after
scaling and masking, unscaled; it has no value vector, so attention rows sum to less than 1.
Window: on sliding layers key j is visible from query i iff 0 <= i - j < 128 (exactly 128 keys
including the query itself). Logits and softmax run in fp32 (like OpenAI's Triton reference and
FlashAttention-3 with sinks); q/k/v and the output stay in the model dtype.
"""

from __future__ import annotations

import torch

from model_shards.config import GptOssConfig
from model_shards.flash import chunk_attention, decode_attention
from model_shards.kv_cache import KVCache, StepKV, gather_rows
from model_shards.norm import rms_norm
from model_shards.rope import apply_rope
from model_shards.weights import AttentionWeights

# Bound on [S, heads, N, L] logits per call; longer prefills are processed in query blocks.
MAX_LOGITS = 1 << 25


def allowed_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor,
                 window: int | None) -> torch.Tensor:
    """q_pos [S, N], k_pos/k_valid [S, L] -> [S, N, L] bool: causal, and within `window` keys
    (counting the query's own position) when window is set."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]  # [S, N, L]
    allowed = k_valid[:, None, :] & (distance >= 0)
    if window is not None:
        allowed &= distance < window
    return allowed


def sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                    sinks: torch.Tensor, scale: float) -> torch.Tensor:
    """q [S, N, nq, d], k/v [S, L, nkv, d], allowed [S, N, L], sinks [nq] -> [S, N, nq, d]."""
    s, n, nq, d = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    qf = q.to(torch.float32).view(s, n, nkv, g, d)
    kf, vf = k.to(torch.float32), v.to(torch.float32)
    logits = torch.einsum("snhgd,slhd->shgnl", qf, kf) * scale  # [S, nkv, g, N, L]
    logits = logits.masked_fill(~allowed[:, None, None, :, :], float("-inf"))
    sink = sinks.to(torch.float32).view(1, nkv, g, 1, 1).expand(s, nkv, g, n, 1)
    probs = torch.softmax(torch.cat((logits, sink), dim=-1), dim=-1)[..., :-1]  # drop the sink column
    out = torch.einsum("shgnl,slhd->snhgd", probs, vf)  # [S, N, nkv, g, d]
    return out.reshape(s, n, nq, d).to(q.dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
           k_valid: torch.Tensor, sinks: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    """sdpa_with_sinks over query blocks small enough to bound the logits' memory."""
    s, n, nq, _ = q.shape
    block = max(1, MAX_LOGITS // max(1, s * nq * k.shape[1]))
    outs = []
    for a in range(0, n, block):
        mask = allowed_keys(q_pos[:, a:a + block], k_pos, k_valid, window)
        outs.append(sdpa_with_sinks(q[:, a:a + block], k, v, mask, sinks, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def attention_block(x: torch.Tensor, w: AttentionWeights, cfg: GptOssConfig, layer: int,
                    cos: torch.Tensor, sin: torch.Tensor, kv: KVCache, kv_view: StepKV) -> torch.Tensor:
    """x [T, H] -> x + attention(norm(x)) [T, H]; writes this step's keys and values into `kv`, then
    attends through the fused kernels (flash.py): decoding sequences in one batched call, each
    prefill chunk blockwise."""
    t = x.shape[0]
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    qkv = w.qkv(rms_norm(x, w.attn_norm, cfg.rms_norm_eps))  # [T, q + 2kv]
    q = apply_rope(qkv[:, :cfg.q_dim].view(t, nq, hd), cos, sin)  # [T, nq, d]
    k = apply_rope(qkv[:, cfg.q_dim:cfg.q_dim + cfg.kv_dim].view(t, nkv, hd), cos, sin)  # [T, nkv, d]
    v = qkv[:, cfg.q_dim + cfg.kv_dim:].view(t, nkv, hd)  # [T, nkv, d]
    kv.write(layer, kv_view, k, v)
    return x + w.out(attend_cached(q, w, cfg, layer, kv, kv_view).reshape(t, cfg.q_dim))  # heads concatenated


def kernel_attention(normed: torch.Tensor, w: AttentionWeights, cfg: GptOssConfig, layer: int, cos: torch.Tensor,
                     sin: torch.Tensor, kv: KVCache, kv_view: StepKV) -> torch.Tensor:
    """attention_block's attention where the Triton kernels run (the residual add and the norm are
    the caller's add_rms_norm): normed [T, H] -> the output projection [T, H]. RoPE and the cache
    write are one kernel (kernels/fused.py)."""
    from model_shards.kernels.fused import rope_write

    keys, values = kv.tensors(layer)
    rows = kv_view.slide_write_rows if cfg.is_sliding(layer) else kv_view.full_write_rows
    q = rope_write(w.qkv(normed), cos, sin, rows, keys, values, cfg.num_attention_heads)  # [T, nq, d]
    return w.out(attend_cached(q, w, cfg, layer, kv, kv_view).reshape(normed.shape[0], cfg.q_dim))


def attend_cached(q: torch.Tensor, w: AttentionWeights, cfg: GptOssConfig, layer: int, kv: KVCache,
                  view: StepKV) -> torch.Tensor:
    """q [T, nq, d] of the step's tokens, whose keys and values are in the cache -> [T, nq, d]:
    decoding sequences in one call (the paged kernel where it runs, else gathered rows through
    flash.py), each prefill chunk blockwise."""
    keys, values = kv.tensors(layer)  # [rows, nkv, d]
    sliding = cfg.is_sliding(layer)
    scale = cfg.head_dim ** -0.5
    window = cfg.sliding_window if sliding else None
    paged = view.decode_paged
    if paged is not None:  # the blocks read in place (triton_kernels: kv_cache.py)
        from model_shards.kernels.paged_attention import paged_decode_attention
    if paged is not None and not view.chunks:  # every token decodes, in order: no scatter into `out`
        table, base = paged.of(sliding)
        return paged_decode_attention(q, keys, values, table, base, paged.ends, w.sinks, scale, kv.block_size, window)
    out = q.new_empty(q.shape)
    if view.decode_tokens.numel() and paged is not None:
        table, base = paged.of(sliding)
        out[view.decode_tokens] = paged_decode_attention(q[view.decode_tokens], keys, values, table, base,
                                                         paged.ends, w.sinks, scale, kv.block_size, window)
    elif view.decode_tokens.numel():
        rows = view.decode_slide_rows if sliding else view.decode_full_rows  # [G, L]
        bias = view.decode_slide_bias if sliding else view.decode_full_bias
        assert bias is not None, "gathered decode rows need their bias (kv_cache.view)"
        out[view.decode_tokens] = decode_attention(q[view.decode_tokens], gather_rows(keys, rows),
                                                   gather_rows(values, rows), bias, w.sinks, scale)
    for c in view.chunks:
        rows = c.slide_rows if sliding else c.full_rows
        out[c.first:c.first + c.length] = chunk_attention(q[c.first:c.first + c.length], gather_rows(keys, rows),
                                                          gather_rows(values, rows), c.start, window, w.sinks, scale)
    return out

