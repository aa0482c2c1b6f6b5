"""The prepacked linear path pads rows to a few bucket sizes (oneDNN compiles a kernel per row
count): each row's result must not depend on the padding."""

import pytest
import torch

from model_shards import linear
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
