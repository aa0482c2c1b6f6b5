"""The cluster's decode step, counted in each actor (Executor.counted, as `gptoss bench` reports it):
under the device's dispatch (router.py) no actor reads the device on the host more than twice per
step, and the tokens are the local engine's. The host's dispatch (the CPU's default) reads the
routing on the host at every layer, by design."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.bench.benchmark import DecodeRow, bench_decode
from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.dataplane.names import ROUTER
from cluster.engine.engine import Engine
from model_shards.sampling import SamplingParams
from tests.cluster.reference import local_completions

MAX_SYNCS = 2
KV = KVSpec(num_blocks=128, block_size=16, max_seqs=16)
PARAMS = [SamplingParams(max_tokens=10, temperature=0.0), SamplingParams(max_tokens=8, temperature=1.0, seed=4)]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in (5, 140, 30, 12)]


@pytest.fixture(scope="module")
def device_dispatch(ray_session, tiny_hf: Path):
    """Two replicas (two micro-batches each), two shards, the device's dispatch on CPU actors."""
    from cluster.actors.cluster_executor import ClusterExecutor

    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"),
                               ClusterConfig(attention_replicas=2, expert_shards=2, micro_batches=2,
                                             dispatch="device", step_timeout_s=60), KV)
    engine = Engine(executor)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def rows(device_dispatch: Engine) -> list[DecodeRow]:
    return bench_decode(device_dispatch.executor, "cluster", [1, 16], input_len=20, steps=1, warmup=1)


def test_every_actor_syncs_at_most_twice_per_decode_step(rows: list[DecodeRow]) -> None:
    for row in rows:
        counts = row.syncs_by_process or {}
        assert {"replica0", "replica1", ROUTER, "shard0", "shard1"} <= set(counts)
        assert all(n <= MAX_SYNCS for n in counts.values()), (row.batch_size, counts)
        assert row.host_syncs_per_step is not None and row.host_syncs_per_step <= MAX_SYNCS
        assert row.ops_per_layer is not None and row.ops_per_layer > 20


def test_the_device_dispatch_gives_the_local_engine_tokens(device_dispatch: Engine, tiny_hf: Path,
                                                            rows: list[DecodeRow]) -> None:
    reference = local_completions(tiny_hf, prompts(), PARAMS * 2, KV)
    outs = device_dispatch.generate(prompts(), PARAMS * 2, timeout=120)
    for ref, out in zip(reference, outs):
        assert out.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < 1e-4
    stats = device_dispatch.executor.stats()
    assert sum(s.assignments for s in stats.shards) == sum(stats.router.expert_tokens)  # counted on the devices
