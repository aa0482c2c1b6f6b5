from __future__ import annotations

import pytest
import torch

from model_shards.mxfp4 import FP4_VALUES, dequantize, quantize


def test_byte_decode_low_nibble_first() -> None:
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low nibble 1 -> +0.5 (element 0), high nibble 2 -> +1.0 (element 1)
    for scale in (127, 130, 120):
        out = dequantize(blocks, torch.tensor([scale], dtype=torch.uint8), torch.float32)
        assert out.shape == (32,)
        assert out[:2].tolist() == [0.5 * 2.0 ** (scale - 127), 1.0 * 2.0 ** (scale - 127)]
        assert not out[2:].any()


def test_every_code_and_sign() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes[0::2] | (codes[1::2] << 4)).repeat(2)[None]  # [1, 16]
    out = dequantize(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    assert out[:16].tolist() == list(FP4_VALUES)
    assert torch.signbit(out[8])  # code 8 is -0


def test_bf16_decode_is_exact() -> None:
    blocks = torch.randint(0, 256, (4, 3, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (4, 3), dtype=torch.uint8)
    assert torch.equal(dequantize(blocks, scales, torch.bfloat16).float(), dequantize(blocks, scales, torch.float32))


def test_quantize_round_trip_and_error() -> None:
    w = torch.randn(5, 64) * 0.3
    blocks, scales = quantize(w)
    assert blocks.shape == (5, 2, 16) and scales.shape == (5, 2)
    q = dequantize(blocks, scales, torch.float32)
    assert torch.equal(dequantize(*quantize(q), torch.float32), q)  # representable values survive exactly
    assert (q - w).abs().max() <= 0.25 * w.abs().max()  # coarse, but not garbage


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        dequantize(torch.zeros(2, 15, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError):
        quantize(torch.zeros(3, 33))


def test_decoded_experts_are_cached_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """--expert-cache-mb: hot packed experts are decoded once, the budget is shared by the stacks and
    the least recently used matrix goes first; results never change."""
    import model_shards.mxfp4 as mxfp4
    from model_shards.weights import ExpertWeights, Mxfp4Stack, budget_decoded

    blocks, scales = quantize(torch.randn(4 * 8, 64))  # 4 experts of [8, 64]
    blocks, scales = blocks.view(4, 8, *blocks.shape[1:]), scales.view(4, 8, -1)
    stack, other = Mxfp4Stack(blocks, scales), Mxfp4Stack(blocks.clone(), scales.clone())
    budget_decoded([ExpertWeights(0, stack, torch.zeros(4, 8), other, torch.zeros(4, 8))], 2 * 2 * 8 * 64 * 4)
    assert stack.cache_bytes == other.cache_bytes == 2 * 8 * 64 * 4  # two fp32 matrices each
    decoded = []
    real = mxfp4.dequantize
    monkeypatch.setattr(mxfp4, "dequantize", lambda *a, **k: decoded.append(1) or real(*a, **k))
    first = stack.matrix(0, torch.float32)
    assert torch.equal(stack.matrix(0, torch.float32), first) and len(decoded) == 1  # a hit: no decoding
    stack.matrix(1, torch.float32)
    stack.matrix(0, torch.float32)  # 0 is now the most recent
    stack.matrix(2, torch.float32)  # evicts 1, the least recently used
    stack.matrix(0, torch.float32)
    assert len(decoded) == 3
    stack.matrix(1, torch.float32)
    assert len(decoded) == 4
    assert torch.equal(stack.matrix(3, torch.float32), real(blocks[3], scales[3], torch.float32))
