"""The small fused kernels (kernels/fused.py) and the grouped experts with the gather and the scatter
inside, under Triton's interpreter on the CPU (fp32), against the plain ops they replace; then the
whole model on the kernels' path (GPTOSS_KERNELS=triton) against the torch path, and its op count."""

from __future__ import annotations

import copy
import os

import pytest
import torch

pytestmark = [pytest.mark.kernels, pytest.mark.gpu]  # natively on a GPU, interpreted elsewhere

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from model_shards import mxfp4  # noqa: E402
from model_shards.batch import SeqChunk, plan_step  # noqa: E402
from model_shards.config import GptOssConfig, preset  # noqa: E402
from model_shards.decode_graph import StaticDecoder  # noqa: E402
from model_shards.kv_cache import KVCache  # noqa: E402
from model_shards.kernels.fused import add_rms_norm, rope_write, route_topk, sort_assignments  # noqa: E402
from model_shards.linear import Linear  # noqa: E402
from model_shards.model import GptOssModel  # noqa: E402
from model_shards.moe import kernel_grouped, moe_block, route, run_experts  # noqa: E402
from model_shards.norm import rms_norm  # noqa: E402
from model_shards.random_checkpoint import random_weights  # noqa: E402
from model_shards.rope import Rope, apply_rope  # noqa: E402
from model_shards.syncs import count_dispatch  # noqa: E402
from model_shards.weights import ExpertWeights, Mxfp4Stack  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


def test_add_rms_norm_is_the_add_then_the_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    x, delta = torch.randn(5, 72, generator=gen), torch.randn(5, 72, generator=gen)  # 72: a masked tail
    weight = torch.rand(72, generator=gen) + 0.5
    total, normed = add_rms_norm(x, delta, weight, 1e-5)
    torch.testing.assert_close(total, x + delta, rtol=0, atol=0)
    torch.testing.assert_close(normed, rms_norm(x + delta, weight, 1e-5), **TOL)
    same, normed = add_rms_norm(x, None, weight, 1e-5)
    assert same is x
    torch.testing.assert_close(normed, rms_norm(x, weight, 1e-5), **TOL)


def test_rope_write_rotates_q_and_writes_k_and_v_to_their_rows() -> None:
    cfg = preset("tiny")
    t, nq, nkv, d = 6, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(t, (nq + 2 * nkv) * d, generator=gen)
    cos, sin = Rope(cfg).cos_sin(torch.tensor([0, 1, 5, 127, 128, 4000]), torch.float32)
    rows = torch.tensor([3, 9, 4, 17, 0, 30])
    k_cache, v_cache = torch.zeros(32, nkv, d), torch.zeros(32, nkv, d)
    q = rope_write(qkv, cos, sin, rows, k_cache, v_cache, nq)
    torch.testing.assert_close(q, apply_rope(qkv[:, :nq * d].view(t, nq, d), cos, sin), **TOL)
    k = apply_rope(qkv[:, nq * d:(nq + nkv) * d].view(t, nkv, d), cos, sin)
    torch.testing.assert_close(k_cache[rows], k, **TOL)
    torch.testing.assert_close(v_cache[rows], qkv[:, (nq + nkv) * d:].view(t, nkv, d), rtol=0, atol=0)
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[rows] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("tokens,experts", [(1, 16), (7, 32), (64, 128)])
def test_route_topk_is_top_k_then_softmax(tokens: int, experts: int) -> None:
    gen = torch.Generator().manual_seed(tokens)
    t = torch.randn(tokens, 96, generator=gen)
    router = Linear(torch.randn(experts, 96, generator=gen), torch.randn(experts, generator=gen))
    ids, gates = route_topk(t, router.weight, router.bias, 4)
    want_ids, want_gates = route(t, router, 4)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(gates, want_gates, **TOL)
    counts = torch.zeros(experts, dtype=torch.long)
    real = (torch.arange(tokens) % 3 != 2).long()  # every third row is padding: it adds nothing
    route_topk(t, router.weight, router.bias, 4, counts, real)
    want = torch.zeros(experts, dtype=torch.long).index_add_(0, want_ids[real.bool()].flatten(),
                                                             torch.ones(int(real.sum()) * 4, dtype=torch.long))
    assert torch.equal(counts, want)


@pytest.mark.parametrize("n,groups", [(1, 4), (7, 3), (64, 17), (256, 33)])
def test_sort_assignments_is_a_stable_argsort(n: int, groups: int) -> None:
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, groups - 1, (n,), generator=gen)  # the last group stays empty
    order, ends = sort_assignments(ids, groups)
    assert torch.equal(order.long(), torch.argsort(ids, stable=True))
    assert torch.equal(ends.long(), torch.bincount(ids, minlength=groups).cumsum(0))


def experts_of(kind: str) -> tuple[ExpertWeights, GptOssConfig]:
    cfg = preset("tiny")
    w = random_weights(cfg, seed=5).experts[0]
    return (_packed(w) if kind == "mxfp4" else w), cfg


@pytest.mark.parametrize("kind,tokens", [("dense", 12), ("mxfp4", 3), ("mxfp4", 40)])
def test_kernel_experts_gather_and_scatter_in_place(kind: str, tokens: int) -> None:
    """kernel_grouped against the per-expert loop: rows read through token_index (a shard's rows)
    and by assignment // K (the local engine's), a mask of the assignments another shard serves."""
    w, cfg = experts_of(kind)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(w.count, generator=gen)[:4] for _ in range(tokens)]).flatten()  # [T*K]
    gates = torch.rand(tokens * 4, generator=gen)
    token_index = torch.arange(tokens).repeat_interleave(4)
    want = run_experts(x, token_index, ids, gates, w, cfg)
    torch.testing.assert_close(kernel_grouped(x, None, ids, gates, w, cfg, token_div=4), want, rtol=1e-4, atol=1e-4)
    shuffled = torch.randperm(tokens * 4, generator=gen)
    got = kernel_grouped(x, token_index[shuffled], ids[shuffled], gates[shuffled], w, cfg)
    torch.testing.assert_close(got, want[shuffled], rtol=1e-4, atol=1e-4)
    mine = ids < w.count // 2
    got = kernel_grouped(x, token_index, ids, gates, w, cfg, mine)
    torch.testing.assert_close(got, torch.where(mine[:, None], want, 0.0), rtol=1e-4, atol=1e-4)


def prefilled(model: GptOssModel) -> tuple[KVCache, list[int]]:
    """Three sequences prefilled through torch's ops (the interpreter would take minutes): within a
    block, past the sliding window, many blocks."""
    kv = model.new_cache(64)
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 40, 150]
    for s, n in enumerate(lengths):
        kv.place(s, 300)
        model.forward(torch.randint(0, 199_998, (n,), generator=gen), plan_step([SeqChunk(s, 0, n)]), kv)
    kv.place(3, 64)
    return kv, lengths


def on_kernels(model: GptOssModel, kv: KVCache, kernels: bool) -> tuple[GptOssModel, KVCache]:
    """The same model and a copy of the cache, on the kernels' path or torch's."""
    model, kv = copy.copy(model), copy.deepcopy(kv)
    model.kernels = kv.paged = kernels
    return model, kv


def test_the_model_on_the_kernels_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed step (a prefill chunk among decodes) and decode steps, eager and from the static
    buffers (a padding row included), with every kernel against the same model on torch's ops: the
    same logits within fp32 rounding. MXFP4 experts (the CUDA default for MXFP4 checkpoints); dense
    ones go through the same kernel (test_kernel_experts_gather_and_scatter_in_place)."""
    weights = random_weights(preset("tiny"), seed=3)
    weights.experts = [_packed(e) for e in weights.experts]
    base = GptOssModel(weights)
    cache, _ = prefilled(base)
    results = []
    for kernels in (False, True):
        monkeypatch.setenv("GPTOSS_KERNELS", "triton" if kernels else "torch")
        model, kv = on_kernels(base, cache, kernels)
        mixed = [SeqChunk(0, 3, 1), SeqChunk(3, 0, 5), SeqChunk(2, 150, 1)]
        out = [model.forward(torch.tensor([5, 6, 7, 8, 9, 10, 11]), plan_step(mixed), kv)]
        out.append(model.forward(torch.tensor([12, 13, 14]), plan_step([SeqChunk(0, 4, 1), SeqChunk(1, 40, 1),
                                                                         SeqChunk(2, 151, 1)]), kv))
        decoder = StaticDecoder(model, lambda layer, t, real: model.local_moe(layer, t), graphs=False)
        out.append(decoder.run(kv, [SeqChunk(0, 5, 1), SeqChunk(1, 41, 1), SeqChunk(2, 152, 1)], [1, 2, 3]))
        results.append(out)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _packed(w: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(w.first, Mxfp4Stack(*mxfp4.quantize(w.gate_up.weight)), w.gate_up_bias,
                         Mxfp4Stack(*mxfp4.quantize(w.down.weight)), w.down_bias)


def test_a_decode_step_on_the_kernels_launches_under_30_ops_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU would launch for a decode step from the static buffers, counted on the CPU: every
    dispatched op that computes on the device and each Triton launch (host-side index building is not
    device work: syncs.host_work); no host sync; padding rows route nothing."""
    base = GptOssModel(random_weights(preset("tiny"), seed=3))
    cache, _ = prefilled(base)
    monkeypatch.setenv("GPTOSS_KERNELS", "triton")
    model, kv = on_kernels(base, cache, True)
    counts = torch.zeros(model.config.num_experts, dtype=torch.long)
    decoder = StaticDecoder(model, lambda layer, t, real: moe_block(t, model.weights.routers[layer],
                                                                    model.weights.experts[layer], model.config,
                                                                    counts, real), graphs=False)
    decoder.run(kv, [SeqChunk(0, 3, 1), SeqChunk(1, 40, 1), SeqChunk(2, 150, 1)], [1, 2, 3])  # makes the buffers
    with count_dispatch() as count:
        decoder.run(kv, [SeqChunk(0, 4, 1), SeqChunk(1, 41, 1), SeqChunk(2, 151, 1)], [4, 5, 6])
    per_layer = count.ops / model.config.num_hidden_layers
    assert per_layer < 30, (per_layer, count.op_names.most_common(20))
    assert count.syncs == 0, count.sync_sites
    assert int(counts.sum()) == 2 * 3 * 4 * model.config.num_hidden_layers  # 3 real rows of a bucket of 4
