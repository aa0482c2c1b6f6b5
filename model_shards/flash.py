"""Attention through the device's fused kernels, with gpt-oss's sinks folded in afterwards.

The fused kernels (PyTorch's flash attention on CPU, memory-efficient attention on CUDA) do not know
sinks, but they return the log-sum-exp (lse) of each query's logits. A sink logit s joins the softmax
denominator only, so the sink-aware output is the kernel's output times exp(lse) / (exp(lse) + exp(s))
= sigmoid(lse - s). Keys that arrive in two parts (the cached past, then the chunk itself) are
attended separately and merged by their lse, which keeps every mask small: the past needs none.

Shapes follow the kernels: [B, H, L, d]. Grouped-query attention without copying keys: the g query
heads of one kv head are "folded" into the query length ([B, nkv, g * Lq, d]), which is exact when
every folded query may see the same keys (no mask, or a mask shared by the whole group).

On CPU the fused kernels make a chunked prefill's attention an order of magnitude faster than the
einsum implementation kept in attention.py as the reference (docs/measurements.md).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# CUDA's memory-efficient kernel takes an additive bias only when its rows start on 16-byte boundaries
# (its `check_supported`: strides a multiple of 8 elements in bf16, 4 in fp32), and the private op
# used here does not pad the bias as the public scaled_dot_product_attention does. So every key length
# that a bias spans is padded to a multiple of ALIGN with masked keys (kv_cache.py builds decode's
# rows so; chunk_attention pads its window), and `check_aligned` makes that a checked rule.
ALIGN = 8


def aligned(n: int) -> int:
    """n rounded up to a multiple of ALIGN."""
    return -(-n // ALIGN) * ALIGN


def check_aligned(bias: torch.Tensor) -> None:
    """Raises unless every stride of `bias` but the last (1) is a multiple of ALIGN elements (0, a
    broadcast dimension, is one) and its last dimension starts aligned."""
    if bias.stride(-1) != 1 or any(s % ALIGN for s in bias.stride()[:-1]) or bias.storage_offset() % ALIGN:
        raise ValueError(f"attention bias of shape {tuple(bias.shape)} and strides {bias.stride()} is not "
                         f"aligned to {ALIGN} elements")


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Lq, d], k/v [B, H, Lk, d], bias broadcastable to [B, H, Lq, Lk] (0 or -inf, q's dtype)
    -> out [B, H, Lq, d] in q's dtype, lse [B, H, Lq] fp32. `causal`: query i sees keys <= i."""
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse.to(torch.float32)
    if q.device.type == "cuda":
        if bias is not None:  # the kernel wants a bias of the full shape (broadcast strides are fine)
            bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            check_aligned(bias)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale)
        return out, lse[..., :q.shape[2]].to(torch.float32)  # lse comes padded to a multiple of 32 queries
    return attention_lse_math(q, k, v, bias, causal, scale)


def attention_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same in plain fp32 tensor ops (any device; the reference the kernels are tested against)."""
    logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale  # [B, H, Lq, Lk]
    if bias is not None:
        logits = logits + bias.float()
    if causal:
        lq, lk = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1), NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)  # [B, H, Lq]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v.float()).to(q.dtype), lse


def merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attentions of the same queries over disjoint key sets -> the attention over their union.
    out [..., d], lse [...]."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype), lse


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """out [..., H, d], lse [..., H] fp32, sinks [H] fp32 -> out scaled by sigmoid(lse - sink)."""
    return (out.float() * torch.sigmoid(lse - sinks)[..., None]).to(out.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, sinks: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per sequence. q [G, nq, d], k/v [G, L, nkv, d] (padded), bias [G, 1, 1, L] -> [G, nq, d]."""
    g_, nq, d = q.shape
    nkv = k.shape[2]
    folded = q.view(g_, nkv, nq // nkv, d)  # [G, nkv, g, d]: a sequence's query heads share its mask
    out, lse = attention_lse(folded, k.transpose(1, 2), v.transpose(1, 2), bias, False, scale)  # [G, nkv, g, *]
    return with_sinks(out.reshape(g_, nq, d), lse.reshape(g_, nq), sinks)


def _fold(q: torch.Tensor, nkv: int) -> torch.Tensor:
    """[N, nq, d] -> [1, nkv, g * N, d] (row j * N + t: head j of the group, query t)."""
    n, nq, d = q.shape
    return q.view(n, nkv, nq // nkv, d).permute(1, 2, 0, 3).reshape(1, nkv, -1, d)


def _unfold(out: torch.Tensor, lse: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of _fold for the output [1, nkv, g*N, d] and lse [1, nkv, g*N] -> [N, nq, d], [N, nq]."""
    nkv, d = out.shape[1], out.shape[3]
    out = out.view(nkv, -1, n, d).permute(2, 0, 1, 3).reshape(n, -1, d)
    return out, lse.view(nkv, -1, n).permute(2, 0, 1).reshape(n, -1)


def _heads(x: torch.Tensor, nq: int) -> torch.Tensor:
    """[L, nkv, d] -> [1, nq, L, d] (each kv head repeated for its query heads)."""
    return x.repeat_interleave(nq // x.shape[1], dim=1).transpose(0, 1)[None]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None,
                    sinks: torch.Tensor, scale: float, block: int = 512) -> torch.Tensor:
    """The queries of one prefill chunk at positions [start, start + N), processed `block` queries at a
    time so that time and memory grow with the keys each block reads, not with a dense N x L matrix.

    q [N, nq, d]. Full attention (window None): k/v [start + N, nkv, d], positions [0, start + N).
    Sliding window: k/v [aligned(window - 1 + N), nkv, d], positions from start - window + 1 (rows
    before position 0 and from start + N on are padding). -> [N, nq, d]."""
    n, nq, d = q.shape
    nkv = k.shape[1]
    outs = []
    for a in range(0, n, block):
        qb = q[a:a + block]  # [B, nq, d]
        b = qb.shape[0]
        if window is None:
            own = attention_lse(qb.transpose(0, 1)[None], _heads(k[start + a:start + a + b], nq),
                                _heads(v[start + a:start + a + b], nq), None, True, scale)
            out, lse = own[0][0].transpose(0, 1), own[1][0].transpose(0, 1)  # [B, nq, d], [B, nq]
            if start + a:  # the cached past and the chunk's earlier blocks: no mask at all
                past = attention_lse(_fold(qb, nkv), k[None, :start + a].transpose(1, 2),
                                     v[None, :start + a].transpose(1, 2), None, False, scale)
                out, lse = merge((out, lse), _unfold(*past, b))
        else:
            width = aligned(window - 1 + b)  # positions [start + a - window + 1, start + a + b), then padding
            keys = slice(a, a + width)
            first = start + a - (window - 1)
            kpos = torch.arange(first, first + width, device=q.device)
            qpos = torch.arange(start + a, start + a + b, device=q.device)
            seen = (qpos[:, None] - kpos[None, :] >= 0) & (qpos[:, None] - kpos[None, :] < window) & (kpos >= 0)
            bias = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, NEG_INF)
            o, lse = attention_lse(qb.transpose(0, 1)[None], _heads(k[keys], nq), _heads(v[keys], nq),
                                   bias[None, None], False, scale)
            out, lse = o[0].transpose(0, 1), lse[0].transpose(0, 1)
        outs.append(with_sinks(out, lse, sinks))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
