"""MXFP4 as stored in the gpt-oss checkpoints: FP4 E2M1 values in blocks of 32 along the input
dimension, two values per byte with the LOW nibble first, one E8M0 scale byte per block (bias 127).

`dequantize` is the decoder used at load time or on use; `quantize` exists so that random test
checkpoints can be written in the real format.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127

# Index = 4-bit code, bit 3 is the sign.
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> [..., G*32] in `dtype`.

    Exact for every in-range exponent: values are computed in fp32 (a FP4 value times a power of
    two) and only then cast."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError("MXFP4 blocks and scales must be uint8")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 shapes disagree: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]  # [..., G, 16] even elements
    hi = lut[(blocks >> 4).long()]  # [..., G, 16] odd elements
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., G, 32]
    exponent = scales.to(torch.int32) - SCALE_BIAS  # [..., G]
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.flatten(-2).to(dtype)  # [..., G*32]


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float (N a multiple of 32) -> (blocks [..., N/32, 16] uint8, scales [..., N/32] uint8).

    The scale of a block is the smallest power of two that brings its largest magnitude within
    6 (the largest FP4 value), so nothing is clipped; values round to the nearest FP4 magnitude."""
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"last dimension {weight.shape[-1]} is not a multiple of {BLOCK}")
    w = weight.to(torch.float32).unflatten(-1, (-1, BLOCK))  # [..., G, 32]
    amax = w.abs().amax(dim=-1).clamp_min(2.0 ** -126)  # [..., G]
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    scaled = w / torch.exp2(exponent).unsqueeze(-1)  # [..., G, 32], |x| <= 6
    magnitudes = torch.tensor(FP4_VALUES[:8], dtype=torch.float32, device=w.device)
    index = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    codes = (index | (scaled < 0).long() << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble = even element
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
