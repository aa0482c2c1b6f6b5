"""The prepacked linear path pads rows to a few bucket sizes (oneDNN compiles a kernel per row
count): each row's result must not depend on the padding."""

import pytest
import torch

from model_shards import linear
from model_shards.weights import FUSED_MAX_TOKENS, STACKED_MAX_TOKENS
from model_shards.linear import Linear, bucket_rows


def test_bucket_sizes_are_few_and_cover_every_count():
    sizes = {bucket_rows(n) for n in range(1, 8193)}
    assert len(sizes) <= 120
    for n in range(1, 8193):
        b = bucket_rows(n)
        assert b == n if n <= 16 else (b >= n and b - n < max(16, n / 16) and b % 16 == 0), n


@pytest.mark.skipif(not linear.can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                    reason="no oneDNN prepacking on this build")
def test_padded_rows_give_the_same_bits_as_each_row_alone():
    gen = torch.Generator().manual_seed(0)
    layer = Linear(torch.randn(96, 64, generator=gen).bfloat16(), torch.randn(96, generator=gen).bfloat16())
    layer.prepare()
    assert layer.packed is not None
    x = torch.randn(300, 64, generator=gen).bfloat16()
    whole = layer(x)  # padded to 320 rows
    assert whole.shape == (300, 96) and whole.is_contiguous()
    for n in (1, 5, 17, 33, 255, 257, 300):  # counts in every bucket regime
        got = layer(x[:n])
        assert got.shape == (n, 96)
        assert torch.equal(got, whole[:n]), n
    # and the prepacked path agrees with F.linear within bf16 rounding
    torch.testing.assert_close(whole.float(), torch.nn.functional.linear(x, layer.weight, layer.bias).float(),
                               atol=0.06, rtol=0.02)


@pytest.mark.skipif(not linear.can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                    reason="no oneDNN prepacking on this build")
def test_warm_up_calls_each_prepacked_shape_at_each_bucket(monkeypatch, tmp_path):
    from model_shards.loader import load_local_model
    from model_shards.random_checkpoint import make_tiny
    from model_shards.weights import warm_up

    make_tiny(tmp_path, "tiny", as_mxfp4=False)
    assert warm_up(load_local_model(str(tmp_path), torch.float32).weights, 64, 4) == 0  # float32: nothing prepacked
    weights = load_local_model(str(tmp_path), torch.bfloat16).weights
    seen: list[tuple[tuple[int, ...], int]] = []
    real = linear.apply

    def spy(x, weight, bias, packed):
        seen.append((tuple(weight.shape), x.shape[0]))
        return real(x, weight, bias, packed)

    monkeypatch.setattr(linear, "apply", spy)
    calls = warm_up(weights, 64, 4)
    cfg = weights.config
    shapes = {tuple(weights.attention[0].qkv.weight.shape), tuple(weights.attention[0].out.weight.shape),
              tuple(weights.routers[0].weight.shape), tuple(weights.experts[0].gate_up.weight.shape[1:]),
              tuple(weights.experts[0].down.weight.shape[1:])}
    buckets = sorted({linear.bucket_rows(n) for n in range(1, 65)})
    gate_up = weights.experts[0].gate_up.weight
    stacked = (gate_up.shape[0] * gate_up.shape[1], gate_up.shape[2])  # the whole stack, up to STACKED_MAX_TOKENS
    down = weights.experts[0].down.weight
    side_by_side = (down.shape[1], down.shape[0] * down.shape[2])  # the local engine's fused down, up to FUSED_MAX_TOKENS
    expected = ({(s, n) for s in shapes for n in buckets}
                | {(stacked, linear.bucket_rows(n)) for n in range(1, min(64, STACKED_MAX_TOKENS) + 1)}
                | {(side_by_side, linear.bucket_rows(n)) for n in range(1, min(64, FUSED_MAX_TOKENS) + 1)}
                | {((cfg.vocab_size, cfg.hidden_size), n) for n in (1, 2, 3, 4)})
    assert set(seen) == expected and calls == len(seen) == len(expected)
