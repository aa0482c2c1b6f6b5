"""The fused-kernel attention (flash.py) against the plain reference (attention.sdpa_with_sinks), in
float32: sinks through the log-sum-exp, GQA folding, blockwise prefill with a cached past, windows."""

from __future__ import annotations

import pytest
import torch

from model_shards.attention import allowed_keys, sdpa_with_sinks
from model_shards.flash import (ALIGN, aligned, attention_lse, attention_lse_math, check_aligned, chunk_attention,
                                decode_attention)

NQ, NKV, D, W = 8, 2, 16, 8
SCALE = D ** -0.5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              window: int | None, sinks: torch.Tensor) -> torch.Tensor:
    """q [N, nq, d] at q_pos [N]; k/v [L, nkv, d] at k_pos [L] (negative: padding) -> [N, nq, d]."""
    allowed = allowed_keys(q_pos[None], k_pos[None], (k_pos >= 0)[None], window)
    return sdpa_with_sinks(q[None], k[None], v[None], allowed, sinks, SCALE)[0]


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_equals_plain_ops(causal: bool) -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, D), torch.randn(2, 3, 5, D), torch.randn(2, 3, 5, D)
    bias = torch.zeros(2, 1, 5, 5).masked_fill_(torch.rand(2, 1, 5, 5) < 0.3, float("-inf"))
    bias[..., 0] = 0  # every query sees at least one key
    out, lse = attention_lse(q, k, v, bias, causal, SCALE)
    ref_out, ref_lse = attention_lse_math(q, k, v, bias, causal, SCALE)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize("start, n, window, block", [(0, 21, None, 8), (13, 21, None, 8), (13, 21, W, 8),
                                                    (0, 5, W, 512), (40, 3, W, 2), (40, 17, None, 512)])
def test_chunk_attention_equals_the_reference(start: int, n: int, window: int | None, block: int) -> None:
    torch.manual_seed(start + n)
    q, sinks = torch.randn(n, NQ, D), torch.randn(NQ)
    if window is None:
        k, v = torch.randn(start + n, NKV, D), torch.randn(start + n, NKV, D)
        k_pos = torch.arange(start + n)
    else:  # keys padded to the alignment (rows past the chunk's end: never seen)
        width = aligned(window - 1 + n)
        k, v = torch.randn(width, NKV, D), torch.randn(width, NKV, D)
        k_pos = torch.arange(start - window + 1, start - window + 1 + width)
    out = chunk_attention(q, k, v, start, window, sinks, SCALE, block)
    expected = reference(q, k, v, torch.arange(start, start + n), k_pos, window, sinks)
    assert torch.allclose(out, expected, atol=1e-5)


def test_decode_attention_equals_the_reference_per_sequence() -> None:
    torch.manual_seed(3)
    lengths = [5, 1, 12]
    q, sinks = torch.randn(3, NQ, D), torch.randn(NQ)
    k, v = torch.randn(3, 12, NKV, D), torch.randn(3, 12, NKV, D)
    seen = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]  # [G, L] padded keys
    bias = torch.zeros(3, 12).masked_fill_(~seen, float("-inf"))[:, None, None, :]
    out = decode_attention(q, k, v, bias, sinks, SCALE)
    for g, n in enumerate(lengths):
        expected = reference(q[g:g + 1], k[g, :n], v[g, :n], torch.tensor([n - 1]), torch.arange(n), None, sinks)
        assert torch.allclose(out[g:g + 1], expected, atol=1e-5)


def test_the_alignment_rule() -> None:
    assert [aligned(n) for n in (0, 1, 8, 9, 127, 128, 135)] == [0, 8, 8, 16, 128, 128, 136]
    check_aligned(torch.zeros(3, 1, 1, 40).expand(3, 8, 1, 40))  # broadcast strides (0) are aligned
    check_aligned(torch.zeros(1, 1, 5, 136))
    for bad in (torch.zeros(3, 1, 1, 33), torch.zeros(1, 1, 5, 127 + 5), torch.zeros(2, 48)[:, 1:41]):
        with pytest.raises(ValueError, match="not aligned"):
            check_aligned(bad)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_equals_plain_ops(causal: bool) -> None:
    """Queries of any count; the keys a bias spans padded to the alignment (ALIGN)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, aligned(33), 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = torch.zeros(2, 1, 33, aligned(33), device="cuda", dtype=torch.bfloat16)
    bias[..., 20:] = float("-inf")
    assert aligned(33) % ALIGN == 0
    out, lse = attention_lse(q, k, v, bias, causal, 0.125)
    ref_out, ref_lse = attention_lse_math(q, k, v, bias, causal, 0.125)
    assert torch.allclose(out.float(), ref_out.float(), atol=2e-2) and torch.allclose(lse, ref_lse, atol=1e-2)
