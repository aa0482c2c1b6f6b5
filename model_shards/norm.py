"""RMSNorm as gpt-oss computes it."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] fp32 -> [..., H] in x's dtype.

    The weight multiplies in fp32, BEFORE the cast back (Llama casts first; the difference is a
    bf16 rounding per element)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.to(torch.float32) * xf).to(x.dtype)
