"""The cluster's decode step, counted in each actor (Executor.counted, as `gptoss bench` reports it):
the attention replica and the expert shards ask the host for nothing per layer. The router still
does: it plans each layer's dispatch on the host (the remaining part of the GPU decode step issue)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.bench.benchmark import DecodeRow, bench_decode
from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.dataplane.names import ROUTER

MAX_SYNCS = 2
KV = KVSpec(num_blocks=128, block_size=16, max_seqs=16)


@pytest.fixture(scope="module")
def rows(ray_session, tiny_hf: Path) -> list[DecodeRow]:
    from cluster.actors.cluster_executor import ClusterExecutor

    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"),
                               ClusterConfig(attention_replicas=1, expert_shards=2, micro_batches=2,
                                             step_timeout_s=60), KV)
    try:
        return bench_decode(executor, "cluster", [1, 16], input_len=20, steps=1, warmup=1)
    finally:
        executor.shutdown()


def test_replica_and_shards_sync_at_most_twice_per_decode_step(rows: list[DecodeRow]) -> None:
    for row in rows:
        counts = row.syncs_by_process or {}
        assert {"replica0", ROUTER, "shard0", "shard1"} <= set(counts)
        assert all(n <= MAX_SYNCS for name, n in counts.items() if name != ROUTER), (row.batch_size, counts)
        assert row.ops_per_layer is not None and row.ops_per_layer > 20


@pytest.mark.xfail(strict=True, reason="the router reads each layer's expert ids and gates on the host to plan "
                                       "its dispatch (docs/gpu.md: what is left)")
def test_router_syncs_at_most_twice_per_decode_step(rows: list[DecodeRow]) -> None:
    assert all((row.syncs_by_process or {})[ROUTER] <= MAX_SYNCS for row in rows)
