from __future__ import annotations

import torch

from model_shards.attention import allowed_keys, sdpa_with_sinks


def test_window_boundary_127_allowed_128_masked() -> None:
    q_pos = torch.tensor([[300]])
    k_pos = torch.arange(301)[None]
    allowed = allowed_keys(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), window=128)[0, 0]
    assert allowed[300 - 127] and not allowed[300 - 128]
    assert int(allowed.sum()) == 128  # exactly 128 keys, the query's own included
    full = allowed_keys(q_pos, k_pos, torch.ones_like(k_pos, dtype=torch.bool), window=None)[0, 0]
    assert int(full.sum()) == 301
    future = allowed_keys(torch.tensor([[5]]), torch.tensor([[6]]), torch.tensor([[True]]), window=None)
    assert not future.any()


def _probabilities(q: torch.Tensor, k: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention weights recovered by attending to one-hot values: out[..., j] = p_j (L <= d)."""
    s, l, nkv, d = k.shape
    v = torch.eye(l, d)[None, :, None, :].expand(s, l, nkv, d)  # value j = e_j
    allowed = torch.ones(s, q.shape[1], l, dtype=torch.bool)
    return sdpa_with_sinks(q, k, v, allowed, sinks, scale=0.125)[..., :l]


def test_sinks_take_probability_mass() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 6, 2, 8)
    sinks = torch.tensor([0.0, 1.0, 2.0, -30.0])
    rows = _probabilities(q, k, sinks)[0, 0].sum(-1)  # [heads]
    assert (rows[:3] < 1).all()
    assert rows[3] > 0.999999  # a very negative sink takes (almost) nothing
    assert rows[0] > rows[1] > rows[2]  # larger sink logits take more
    # exactly: row sum = sum(exp(s)) / (sum(exp(s)) + exp(sink)), sink unscaled
    logits = torch.einsum("hd,lhd->hl", q[0, 0].view(2, 2, 8).reshape(4, 8),
                          k[0].repeat_interleave(2, dim=1)) * 0.125
    z = logits.exp().sum(-1)
    assert torch.allclose(rows, z / (z + sinks.exp()), atol=1e-6)


def test_gqa_maps_consecutive_query_heads_to_a_kv_head() -> None:
    torch.manual_seed(1)
    q = torch.randn(1, 1, 4, 8)
    k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 5, 2, 8)
    allowed = torch.ones(1, 1, 5, dtype=torch.bool)
    sinks = torch.zeros(4)
    out = sdpa_with_sinks(q, k, v, allowed, sinks, 0.125)
    v2 = v.clone()
    v2[:, :, 1] += 100  # changing kv head 1 may only change query heads 2 and 3
    out2 = sdpa_with_sinks(q, k, v2, allowed, sinks, 0.125)
    changed = (out - out2).abs().amax(-1)[0, 0] > 1e-3
    assert changed.tolist() == [False, False, True, True]
