"""The MXFP4 grouped expert matmul under Triton's interpreter on the CPU (fp32), against the
dequantized weights through plain ops: 1, 7 and 64 rows per expert, empty experts, the bias, the
SwiGLU epilogue (gate_up) and the router-weight epilogue (down)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]  # natively on a GPU, interpreted elsewhere

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from model_shards import mxfp4  # noqa: E402
from model_shards.kernels.mxfp4_moe import grouped_mxfp4  # noqa: E402
from model_shards.moe import swiglu  # noqa: E402

LIMIT, ALPHA = 7.0, 1.702


def experts(n: int, out: int, k_in: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    blocks, scales = mxfp4.quantize(torch.randn(n, out, k_in, generator=gen) / k_in ** 0.5)
    return blocks, scales, mxfp4.dequantize(blocks, scales, torch.float32)


@pytest.mark.parametrize("counts", [[1, 0, 7, 64], [0, 0, 3, 0], [64, 1, 0, 7]])
def test_grouped_mxfp4_matches_the_dequantized_weights(counts: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(counts))
    k_in, out = 96, 80  # K a multiple of 32 but not of the 64-wide K tile; OUT not of the 32-wide N tile
    blocks, scales, dense = experts(len(counts), out, k_in, gen)
    bias = torch.randn(len(counts), out, generator=gen)
    x = torch.randn(sum(counts), k_in, generator=gen)
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    weights = torch.rand(sum(counts), generator=gen)
    expected, expected_act, expected_scaled = [], [], []
    start = 0
    for e, n in enumerate(counts):
        y = F.linear(x[start:start + n], dense[e], bias[e])
        expected.append(y)
        expected_act.append(swiglu(y, LIMIT, ALPHA))
        expected_scaled.append(y * weights[start:start + n, None])
        start += n
    got = grouped_mxfp4(x, blocks, scales, bias, ends)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-4, atol=1e-4)
    act = grouped_mxfp4(x, blocks, scales, bias, ends, swiglu=(LIMIT, ALPHA))
    torch.testing.assert_close(act, torch.cat(expected_act), rtol=1e-4, atol=1e-4)
    scaled = grouped_mxfp4(x, blocks, scales, bias, ends, row_scale=weights)
    torch.testing.assert_close(scaled, torch.cat(expected_scaled), rtol=1e-4, atol=1e-4)


def test_the_moe_runs_packed_experts_through_the_kernel() -> None:
    """moe.grouped_experts with MXFP4 stacks (what CUDA runs for --expert-weights mxfp4) against the
    per-expert loop that decodes each expert (the CPU's path), empty experts and a mask included."""
    from model_shards.config import preset
    from model_shards.moe import grouped_experts, run_experts
    from model_shards.weights import ExpertWeights, Mxfp4Stack

    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(5)
    n, h, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    gate_up = Mxfp4Stack(*mxfp4.quantize(torch.randn(n, 2 * inter, h, generator=gen) / h ** 0.5))
    down = Mxfp4Stack(*mxfp4.quantize(torch.randn(n, h, inter, generator=gen) / inter ** 0.5))
    w = ExpertWeights(0, gate_up, torch.randn(n, 2 * inter, generator=gen) * 0.1, down,
                      torch.randn(n, h, generator=gen) * 0.02)
    x = torch.randn(9, h, generator=gen)
    token_index = torch.arange(9).repeat_interleave(2)  # [18]
    ids = torch.randint(0, n // 2, (18,), generator=gen)  # half the experts never used
    gates = torch.rand(18, generator=gen)
    expected = run_experts(x, token_index, ids, gates, w, cfg)
    torch.testing.assert_close(grouped_experts(x, token_index, ids, gates, w, cfg), expected, rtol=1e-4, atol=1e-4)
    mine = torch.rand(18, generator=gen) < 0.5
    masked = grouped_experts(x, token_index, ids, gates, w, cfg, mine)
    torch.testing.assert_close(masked, torch.where(mine[:, None], expected, 0.0), rtol=1e-4, atol=1e-4)
