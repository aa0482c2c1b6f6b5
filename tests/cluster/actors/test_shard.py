"""An expert shard's answers and a replica's merge of them, without Ray: the router's dispatch of two
replicas' rows over two shards, each shard's compute and each replica's merge give what the local
engine's MoE block gives for the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import ModelSource, RouterSpec, ShardSpec, expert_bounds
from cluster.balancing.eplb import initial_placement, slot_counts
from cluster.dataplane.messages import MoeRoute, ShardRequest, ShardResult
from cluster.dataplane.names import replica_name, shard_name
from cluster.actors.replica import merge_answers
from cluster.actors.router import Router
from cluster.actors.shard import ExpertShard
from model_shards import linear
from model_shards.loader import load_local_model
from model_shards.moe import moe_block

ROWS = 64  # kernels warmed up to this many rows (the specs' default is the engine's whole step budget)


class Outbox:
    """Stands in for the router's endpoint: keeps what it sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, ShardRequest | MoeRoute]] = []

    def send(self, peer: str, message: ShardRequest | MoeRoute) -> None:
        self.sent.append((peer, message))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_replicas_rows_over_two_shards_merge_to_the_local_moe(tiny_hf: Path, dtype: str) -> None:
    source = ModelSource(str(tiny_hf), dtype)
    cfg = source.config()
    bounds = expert_bounds(cfg.num_experts, 2)
    placement = initial_placement(bounds, slot_counts(bounds, 0, cfg.num_experts), cfg.num_hidden_layers)
    router = Router(RouterSpec(source, placement, max_rows=ROWS))
    shards = {shard_name(j): ExpertShard(ShardSpec(source, j, bounds[j], placement.shard(j), max_rows=ROWS))
              for j in range(len(bounds))}
    local = load_local_model(str(tiny_hf), source.torch_dtype)
    sizes, layer, k = [3, 9], 1, cfg.experts_per_token
    t = torch.randn(sum(sizes), cfg.hidden_size, generator=torch.Generator().manual_seed(3)).to(source.torch_dtype)

    out = Outbox()
    with torch.inference_mode():
        router.dispatch(5, layer, 0, t, [0, 1], sizes, out)
        answers: dict[str, dict[int, ShardResult]] = {}  # replica -> shard -> its answer
        for peer, request in out.sent:
            if isinstance(request, ShardRequest):
                for r, part in shards[peer].compute(request):
                    answers.setdefault(replica_name(r), {})[int(peer.removeprefix("shard"))] = part
        routes = {peer: m for peer, m in out.sent if isinstance(m, MoeRoute)}
        assert sorted(routes) == ["replica0", "replica1"]
        for r, rows in enumerate(torch.split(t, sizes)):
            route = routes[replica_name(r)]
            parts = [answers[replica_name(r)][s] for s in route.shards.tolist()]
            merged = merge_answers(route, parts, k, source.torch_dtype, torch.device("cpu"))
            expected = moe_block(rows, local.weights.routers[layer], local.weights.experts[layer], cfg)
            assert merged.shape == expected.shape and merged.dtype == expected.dtype
            if dtype == "float32":  # one matmul per expert and the fixed k order on both sides
                assert not any(p.summed for p in parts)
                torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
            else:  # each side sums in its own order: bf16 rounding apart
                torch.testing.assert_close(merged.float(), expected.float(), atol=3e-2, rtol=3e-2)
    summed = [p.summed for by_shard in answers.values() for p in by_shard.values()]
    # bf16 on a CPU that prepacks: few rows over most of each shard's experts come summed per token
    assert any(summed) == (dtype == "bfloat16" and linear.can_prepack(torch.zeros(2, 2, dtype=torch.bfloat16)))
