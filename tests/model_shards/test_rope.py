from __future__ import annotations

import math

import pytest
import torch

from model_shards.config import preset
from model_shards.rope import Rope, apply_rope, yarn_concentration, yarn_correction_range, yarn_inv_freq

CFG = preset("gpt-oss-20b")


def test_yarn_correction_range_is_not_rounded() -> None:
    low, high = yarn_correction_range(CFG)
    assert low == pytest.approx(8.092779115512402, abs=1e-12)
    assert high == pytest.approx(17.39802450158856, abs=1e-12)
    assert yarn_correction_range(CFG.replace(rope_truncate=True)) == (8, 18)


def test_concentration() -> None:
    assert yarn_concentration(CFG) == pytest.approx(1.3465735902799727, abs=1e-15)
    assert yarn_concentration(CFG) ** 2 == pytest.approx(1.8133, abs=1e-4)


def test_inv_freq_values() -> None:
    inv = yarn_inv_freq(CFG)
    assert inv.dtype == torch.float32 and inv.shape == (32,)
    assert inv[:4].tolist() == pytest.approx([1.0, 0.6890443, 0.4747821, 0.3271459], rel=1e-6)
    assert inv[-3:].tolist() == pytest.approx([6.368209e-07, 4.387978e-07, 3.023511e-07], rel=1e-5)
    base = CFG.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert torch.equal(inv[:9], 1 / base[:9])  # j <= 8: pure extrapolation
    assert torch.allclose(inv[18:], 1 / (32 * base[18:]))  # j >= 18: pure interpolation


def test_cos_and_sin_both_carry_the_concentration() -> None:
    rope = Rope(CFG)
    cos, sin = rope.cos_sin(torch.tensor([0, 5]), torch.float32)
    assert cos[0].tolist() == pytest.approx([1.3465736] * 32)
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, 1.3465736**2))


def test_rotation_pairs_j_with_j_plus_half() -> None:
    d = CFG.head_dim
    x = torch.zeros(1, 1, d)
    x[0, 0, 3] = 1.0  # only dimension 3 set: rotation must move mass only into 3 + d/2
    angle = 0.7
    cos = torch.full((1, d // 2), math.cos(angle))
    sin = torch.full((1, d // 2), math.sin(angle))
    out = apply_rope(x, cos, sin)[0, 0]
    assert out[3].item() == pytest.approx(math.cos(angle)) and out[3 + d // 2].item() == pytest.approx(math.sin(angle))
    assert out.abs().sum().item() == pytest.approx(abs(math.cos(angle)) + abs(math.sin(angle)))
