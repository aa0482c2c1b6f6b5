"""The paged decode attention kernel under Triton's interpreter on the CPU (fp32), against the
reference attention over the same keys gathered densely: sinks, the sliding window, ragged lengths,
several block tables (shuffled blocks, a sliding table that starts past block 0)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]  # natively on a GPU, interpreted elsewhere

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):  # CI installs it ([test] extra): never skip there
    pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from model_shards.attention import allowed_keys, sdpa_with_sinks  # noqa: E402
from model_shards.kernels.paged_attention import choose_splits, paged_decode_attention  # noqa: E402

NQ, NKV, D, BS = 16, 2, 64, 16
SCALE = D ** -0.5


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, end: int, window: int | None,
              sinks: torch.Tensor) -> torch.Tensor:
    """One sequence: q [nq, d], keys/values [end, nkv, d] of positions [0, end) -> [nq, d]."""
    pos = torch.arange(end)
    allowed = allowed_keys(torch.tensor([[end - 1]]), pos[None], torch.ones(1, end, dtype=torch.bool), window)
    return sdpa_with_sinks(q[None, None], keys[None], values[None], allowed, sinks, SCALE)[0, 0]


@pytest.mark.parametrize("window", [None, 128, 24])
@pytest.mark.parametrize("block_n,splits", [(16, 1), (32, 1), (16, 4)])  # 4: the keys split (flash-decoding)
@pytest.mark.parametrize("with_sinks", [True, False])
def test_paged_decode_matches_the_reference(window: int | None, block_n: int, splits: int, with_sinks: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    ends = [1, 17, 40, 130, 300]  # ragged: inside one block, past the window, many blocks
    blocks = 64
    k_cache = torch.randn(blocks * BS, NKV, D, generator=gen)
    v_cache = torch.randn(blocks * BS, NKV, D, generator=gen)
    order = torch.randperm(blocks, generator=gen).tolist()  # each sequence's blocks, shuffled in the pool
    tables, bases, taken = [], [], 0
    width = max(-(-e // BS) for e in ends)
    for end in ends:
        n = -(-end // BS)
        own = order[taken:taken + n]
        taken += n
        first = 0 if window is None else max(0, end - window) // BS  # a sliding table starts at the window
        row = own[first:]
        tables.append(row + [0] * (width - len(row)))
        bases.append(first)
    q = torch.randn(len(ends), NQ, D, generator=gen)
    sinks = torch.randn(NQ, generator=gen) if with_sinks else torch.full((NQ,), float("-inf"))  # -inf: no sink
    out = paged_decode_attention(q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32),
                                 torch.tensor(bases, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32),
                                 sinks, SCALE, BS, window, block_n, splits)
    for g, end in enumerate(ends):
        n = -(-end // BS)
        own = order[sum(-(-e // BS) for e in ends[:g]):][:n]
        rows = torch.tensor([b * BS + i for b in own for i in range(BS)])[:end]
        expected = reference(q[g], k_cache[rows], v_cache[rows], end, window, sinks)
        torch.testing.assert_close(out[g], expected, rtol=1e-4, atol=1e-4)


def test_splits_only_when_the_grid_is_small_and_the_context_long() -> None:
    assert choose_splits(programs=8, keys=8192) == 32  # batch 1 of gpt-oss (8 KV heads), a long context
    assert choose_splits(programs=8, keys=1024) == 4  # each split keeps at least 256 keys
    assert choose_splits(programs=8, keys=128) == 1  # a sliding layer's window
    assert choose_splits(programs=512, keys=8192) == 1  # batch 64: the grid fills the GPU already
    assert choose_splits(programs=48, keys=8192) == 4  # a power of two, about 256 programs


def test_refuses_shapes_it_cannot_tile() -> None:
    q = torch.zeros(1, 12, 48)
    with pytest.raises(ValueError):
        paged_decode_attention(q, torch.zeros(16, 2, 48), torch.zeros(16, 2, 48), torch.zeros(1, 1, dtype=torch.int32),
                               torch.zeros(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                               torch.zeros(12), 1.0, 16, None)
