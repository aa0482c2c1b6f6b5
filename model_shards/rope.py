"""Rotary position embedding with YaRN (NTK-by-parts), exactly as gpt-oss uses it.

Three details broke other engines: the correction range [low, high] is NOT rounded
(8.0928, 17.3980 for gpt-oss), the concentration 0.1*ln(factor)+1 multiplies BOTH cos and sin, and
the rotation pairs dimension j with j + d/2 (half split, not interleaved pairs).
"""

from __future__ import annotations

import math

import torch

from model_shards.config import GptOssConfig


def yarn_correction_range(cfg: GptOssConfig) -> tuple[float, float]:
    """The dimensions where the ramp between extrapolation and interpolation starts and ends."""
    dim = cfg.head_dim

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.initial_context_length / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:  # transformers' behaviour for configs without `truncate: false`
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_concentration(cfg: GptOssConfig) -> float:
    """Multiplies cos and sin, so attention logits grow by its square (about 1.8133 for gpt-oss)."""
    if cfg.rope_scaling_factor <= 1.0:
        return 1.0
    return 0.1 * math.log(cfg.rope_scaling_factor) + 1.0


def yarn_inv_freq(cfg: GptOssConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """[d/2] fp32 inverse frequencies: pure extrapolation below `low`, pure interpolation
    (divided by the scaling factor) above `high`, linear in between."""
    dim = cfg.head_dim
    freq = cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)  # [d/2]
    extrapolation = 1.0 / freq
    interpolation = 1.0 / (cfg.rope_scaling_factor * freq)
    low, high = yarn_correction_range(cfg)
    if low == high:
        high += 0.001  # same guard as the reference implementations
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp  # 1 where extrapolating
    return interpolation * (1 - mask) + extrapolation * mask


class Rope:
    """Per-model RoPE constants; cos/sin are computed per step for the step's positions (a table of
    131072 positions would cost memory for nothing)."""

    def __init__(self, cfg: GptOssConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = yarn_inv_freq(cfg, device)  # [d/2] fp32
        self.concentration = yarn_concentration(cfg)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, d/2] in `dtype`. Angles are single fp32 products, as in
        every reference (fp64 or TF32 angles would diverge from them at long positions)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, d/2]
        return (angles.cos() * self.concentration).to(dtype), (angles.sin() * self.concentration).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d], cos/sin [T, d/2] -> [T, heads, d] (half-split rotation, in x's dtype)."""
    x1, x2 = x.chunk(2, dim=-1)  # [T, heads, d/2] each
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
