from __future__ import annotations

import pytest
import torch

from model_shards.config import preset
from model_shards.moe import combine, moe_block, route, run_experts, swiglu
from model_shards.random_checkpoint import random_weights
from model_shards import linear
from model_shards.weights import FUSED_MAX_TOKENS, STACKED_MAX_TOKENS, DenseStack, ExpertWeights, RouterWeights


def test_swiglu_clamps_and_interleave() -> None:
    # columns: gate0, up0, gate1, up1, ...
    h = torch.tensor([[-20.0, 20.0, 20.0, -20.0, 1.0, 0.5]])
    out = swiglu(h, limit=7.0, alpha=1.702)[0]
    sig = torch.sigmoid
    assert torch.allclose(out[0], -20 * sig(torch.tensor(-20 * 1.702)) * 8)  # gate -20 NOT clamped; up 20 -> 7
    assert torch.allclose(out[1], 7 * sig(torch.tensor(7 * 1.702)) * -6)  # gate 20 -> 7; up -20 -> -7
    assert torch.allclose(out[2], 1 * sig(torch.tensor(1.702)) * 1.5)


def test_swiglu_in_place_is_the_reference_formula_bit_for_bit_and_leaves_its_input() -> None:
    def reference(h: torch.Tensor) -> torch.Tensor:  # the plain formula on an fp32 copy
        h = h.to(torch.float32)
        gate, up = h[..., 0::2].clamp(max=7.0), h[..., 1::2].clamp(min=-7.0, max=7.0)
        return gate * torch.sigmoid(1.702 * gate) * (up + 1)

    for dtype in (torch.float32, torch.bfloat16):
        h = (torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
        before = h.clone()
        out = swiglu(h, 7.0, 1.702)
        assert out.dtype == torch.float32 and torch.equal(out, reference(h))
        assert torch.equal(h, before)


def test_top4_before_softmax() -> None:
    w = RouterWeights(weight=torch.eye(6), bias=torch.zeros(6))
    t = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0, 2.0]])
    experts, gates = route(t, w, 4)
    assert experts[0].tolist() == [1, 3, 4, 5]
    assert torch.allclose(gates[0], torch.softmax(torch.tensor([5.0, 4.0, 3.0, 2.0]), 0))
    assert torch.allclose(gates.sum(-1), torch.ones(1))


def _slice(w: ExpertWeights, a: int, b: int) -> ExpertWeights:
    return ExpertWeights(a, DenseStack(w.gate_up.weight[a - w.first:b - w.first]), w.gate_up_bias[a - w.first:b - w.first],
                         DenseStack(w.down.weight[a - w.first:b - w.first]), w.down_bias[a - w.first:b - w.first])


def test_experts_split_over_ranges_give_the_same_sum() -> None:
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=1)
    router, experts = weights.routers[0], weights.experts[0]
    t = torch.randn(9, cfg.hidden_size)
    whole = moe_block(t, router, experts, cfg)
    ids, gates = route(t, router, cfg.experts_per_token)
    flat_ids, flat_gates = ids.flatten(), gates.flatten()
    token_index = torch.arange(9).repeat_interleave(cfg.experts_per_token)
    weighted = torch.zeros(flat_ids.shape[0], cfg.hidden_size)
    for a, b in ((0, 3), (3, 11), (11, 16)):  # uneven shards
        mine = (flat_ids >= a) & (flat_ids < b)
        weighted[mine] = run_experts(t, token_index[mine], flat_ids[mine], flat_gates[mine], _slice(experts, a, b), cfg)
    assert torch.equal(combine(weighted, cfg.experts_per_token, t.dtype), whole)


def test_assignments_outside_the_range_are_refused() -> None:
    cfg = preset("tiny")
    experts = _slice(random_weights(cfg, seed=1).experts[0], 4, 8)
    x = torch.randn(1, cfg.hidden_size)
    try:
        run_experts(x, torch.tensor([0]), torch.tensor([9]), torch.tensor([1.0]), experts, cfg)
    except ValueError as exc:
        assert "outside experts [4, 8)" in str(exc)
    else:
        raise AssertionError("expected a ValueError")


def test_row_blocks_cover_every_row_once_in_order() -> None:
    from model_shards.moe import row_blocks

    spans = [(0, 3), (2, 5), (7, 1), (9, 2)]
    blocks = row_blocks(spans, 4)
    assert [b for b, _ in blocks] == [slice(0, 3), slice(3, 8), slice(8, 11)]
    assert [segs for _, segs in blocks] == [[(0, 3)], [(2, 5)], [(7, 1), (9, 2)]]
    assert row_blocks(spans, 100) == [(slice(0, 11), spans)]


def test_blocked_expert_rows_give_the_same_outputs(monkeypatch) -> None:
    import model_shards.moe as moe

    cfg = preset("tiny")
    weights = random_weights(cfg, seed=2)
    t = torch.randn(40, cfg.hidden_size)
    whole = moe_block(t, weights.routers[0], weights.experts[0], cfg)
    monkeypatch.setattr(moe, "ROW_BLOCK", 7)  # experts split across blocks
    assert torch.equal(moe_block(t, weights.routers[0], weights.experts[0], cfg), whole)


@pytest.mark.parametrize("tokens", [5, STACKED_MAX_TOKENS + 1])  # gate_up through the whole stack, then padded
def test_batched_experts_equal_the_per_expert_path(tokens: int) -> None:
    from model_shards.moe import BATCHED_MAX_ROWS, batched_experts, batches_well

    cfg, _, experts = _prepacked_bf16_experts(seed=3)
    segments = [(e, 1 + e % 3) for e in range(cfg.num_experts)]
    x = torch.randn(tokens, cfg.hidden_size, dtype=torch.bfloat16)
    index = torch.randint(0, tokens, (sum(c for _, c in segments),))  # [n] token of each assignment
    rows = x[index]
    per_expert = torch.cat([experts.down.apply(e, swiglu(experts.gate_up.apply(e, part, experts.gate_up_bias[e])
                                                             .float(), cfg.swiglu_limit, cfg.swiglu_alpha).bfloat16(),
                                               experts.down_bias[e])
                            for (e, _), part in zip(segments, rows.split([c for _, c in segments]))])
    if experts.gate_up.packed and experts.gate_up.packed[0] is not None:  # a CPU that prepacks bf16
        n = sum(c for _, c in segments)
        assert batches_well(experts, len(segments), n) and not batches_well(experts, 2, 2)
        assert not batches_well(experts, len(segments), (BATCHED_MAX_ROWS + 1) * len(segments))  # prefill-sized
        assert experts.gate_up.stacked is not None
    batched = batched_experts(x, index, segments, experts, cfg)
    assert torch.allclose(batched.float(), per_expert.float(), atol=3e-2, rtol=2e-2)  # bf16 rounding apart


def _prepacked_bf16_experts(seed: int = 4):
    """-> config, layer 0's router (float32) and its experts in bf16, prepared as a process does."""
    from model_shards.weights import prepare

    cfg, weights = _bf16_weights(seed)
    prepare(weights.experts[0])
    return cfg, weights.routers[0], weights.experts[0]


needs_prepack = pytest.mark.skipif(not linear.can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)),
                                   reason="no oneDNN prepacking on this build")


@needs_prepack
@pytest.mark.parametrize("tokens", [1, 6, FUSED_MAX_TOKENS])
def test_fused_experts_equal_run_experts_and_combine_within_bf16_rounding(tokens: int) -> None:
    from model_shards.moe import fused_experts

    cfg, router, experts = _prepacked_bf16_experts()
    router.weight, router.bias = router.weight.bfloat16(), router.bias.bfloat16()
    t = torch.randn(tokens, cfg.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        expert_ids, gates = route(t, router, cfg.experts_per_token)
        k = cfg.experts_per_token
        reference = combine(run_experts(t, torch.arange(tokens).repeat_interleave(k), expert_ids.flatten(),
                                        gates.flatten(), experts, cfg), k, t.dtype)
        fused = fused_experts(t, expert_ids, gates, experts, cfg)
    assert fused.shape == reference.shape and fused.dtype == torch.bfloat16
    assert torch.allclose(fused.float(), reference.float(), atol=2e-2, rtol=2e-2)  # bf16 rounding apart
    assert (fused.float() - reference.float()).abs().mean() < 2e-3


@needs_prepack
def test_moe_block_fuses_only_few_tokens_over_most_experts_with_both_stacks(monkeypatch) -> None:
    import model_shards.moe as moe

    cfg, router, experts = _prepacked_bf16_experts()
    assert moe.fuses_well(experts, FUSED_MAX_TOKENS, experts.count // 2)
    assert not moe.fuses_well(experts, FUSED_MAX_TOKENS + 1, experts.count)  # many tokens: the padded batched path
    assert not moe.fuses_well(experts, 4, experts.count // 2 - 1)  # few experts in use: one matmul each
    calls = []
    monkeypatch.setattr(moe, "fused_experts", lambda *a: calls.append(a) or torch.zeros(a[0].shape, dtype=a[0].dtype))
    router.weight, router.bias = router.weight.bfloat16(), router.bias.bfloat16()
    counts = torch.zeros(cfg.num_experts, dtype=torch.long)
    with torch.inference_mode():
        moe.moe_block(torch.randn(8, cfg.hidden_size, dtype=torch.bfloat16), router, experts, cfg, counts)
    assert len(calls) == int((counts > 0).sum() * 2 >= experts.count) and int(counts.sum()) == 8 * cfg.experts_per_token


@needs_prepack
@pytest.mark.parametrize("tokens", [2, 9, FUSED_MAX_TOKENS])
def test_fused_rows_of_a_shard_equal_its_outputs_summed_per_token_within_bf16_rounding(tokens: int) -> None:
    """An expert shard's part of each token's K: the rows of the tokens that chose some of its experts
    (here the first half of the stack), each row's assignments summed in one matmul."""
    from model_shards.moe import fused_rows

    cfg, router, experts = _prepacked_bf16_experts()
    router.weight, router.bias = router.weight.bfloat16(), router.bias.bfloat16()
    k = cfg.experts_per_token
    with torch.inference_mode():
        t = torch.randn(tokens, cfg.hidden_size, dtype=torch.bfloat16)
        expert_ids, gates = route(t, router, k)
        mine = (expert_ids.flatten() < experts.count // 2).nonzero().flatten()  # [N] this shard's assignments
        rows, token_index = torch.unique(mine // k, return_inverse=True)  # the rows it is sent, ascending
        x, slots, g = t[rows], expert_ids.flatten()[mine], gates.flatten()[mine].float()
        sums = fused_rows(x, token_index, slots, g, experts, cfg)  # [R, H] fp32
        each = run_experts(x, token_index, slots, g, experts, cfg)  # [N, H] fp32
        reference = torch.zeros_like(sums).index_add_(0, token_index, each)
    assert sums.shape == (rows.shape[0], cfg.hidden_size) and sums.dtype == torch.float32
    torch.testing.assert_close(sums, reference, atol=3e-2, rtol=2e-2)  # bf16 rounding of the activations apart
    assert (sums - reference).abs().mean() < 2e-3


def test_experts_above_the_size_cap_are_not_stacked(monkeypatch) -> None:
    import model_shards.weights as weights_module

    monkeypatch.setattr(weights_module, "STACKED_MAX_BYTES", 1024)
    _, _, experts = _prepacked_bf16_experts()
    assert experts.gate_up.stacked is None and experts.down.stacked is None


def _bf16_weights(seed: int):
    """A random tiny model whose layer-0 experts are bf16 (not prepared)."""
    cfg = preset("tiny")
    weights = random_weights(cfg, seed=seed)
    experts = weights.experts[0]
    for stack in (experts.gate_up, experts.down):
        stack.weight = stack.weight.to(torch.bfloat16)
    experts.gate_up_bias, experts.down_bias = experts.gate_up_bias.bfloat16(), experts.down_bias.bfloat16()
    return cfg, weights


def _bf16_experts(seed: int = 6):
    cfg, weights = _bf16_weights(seed)
    return cfg, weights.experts[0]


def _assignments(cfg, tokens: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k = cfg.experts_per_token
    expert_ids = torch.stack([torch.randperm(cfg.num_experts, generator=gen)[:k] for _ in range(tokens)]).flatten()
    gates = torch.rand(tokens * k, generator=gen).bfloat16()
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).bfloat16()
    return x, torch.arange(tokens).repeat_interleave(k), expert_ids, gates


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
@pytest.mark.parametrize("tokens", [1, 3, 40])  # some experts without rows (empty groups) at 1 and 3
def test_grouped_experts_equal_the_per_expert_path_within_bf16_rounding(tokens: int) -> None:
    from model_shards.moe import grouped_experts, uses_grouped_mm

    cfg, experts = _bf16_experts()
    x, token_index, expert_ids, gates = _assignments(cfg, tokens)
    assert not uses_grouped_mm(x, experts)  # on CPU the prepacked paths run: the reference here
    reference = run_experts(x, token_index, expert_ids, gates, experts, cfg)
    grouped = grouped_experts(x, token_index, expert_ids, gates, experts, cfg)
    assert grouped.dtype == torch.float32 and grouped.shape == reference.shape
    assert torch.allclose(grouped, reference, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_experts_refuse_assignments_outside_the_stack() -> None:
    from model_shards.moe import grouped_experts

    cfg, experts = _bf16_experts()
    x, token_index, expert_ids, gates = _assignments(cfg, 2)
    for bad in (cfg.num_experts, -1):
        ids = expert_ids.clone()
        ids[0] = bad
        with pytest.raises(ValueError, match="outside experts"):
            grouped_experts(x, token_index, ids, gates, experts, cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 64, 600])
def test_run_experts_on_cuda_take_the_grouped_path_and_match_the_cpu(tokens: int) -> None:
    import model_shards.moe as moe
    from model_shards.weights import move_to

    cfg, experts = _bf16_experts()
    x, token_index, expert_ids, gates = _assignments(cfg, tokens)
    reference = run_experts(x, token_index, expert_ids, gates, experts, cfg)
    move_to(experts, "cuda")
    args = [t.cuda() for t in (x, token_index, expert_ids, gates)]
    assert moe.uses_grouped_mm(args[0], experts)
    got = run_experts(*args, experts, cfg)
    assert torch.allclose(got.cpu(), reference, atol=2e-2, rtol=2e-2)
