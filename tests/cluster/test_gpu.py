"""GPU paths (skipped without CUDA): the local engine on the GPU, and the cluster with fractional-GPU
actors sharing one GPU, both giving the CPU engine's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.engine import Engine
from cluster.executor import LocalExecutor
from model_shards.sampling import SamplingParams

KV = KVSpec(num_blocks=128, block_size=16, max_seqs=8)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPTS = [[1000 + i for i in range(n)] for n in (3, 40, 150)]


def greedy_tokens(engine: Engine) -> list[list[int]]:
    try:
        return [c.token_ids for c in engine.generate(PROMPTS, GREEDY, timeout=300)]
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def cpu_tokens(tiny_hf: Path) -> list[list[int]]:
    return greedy_tokens(Engine(LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV)))


@pytest.mark.gpu
def test_local_engine_on_the_gpu(tiny_hf: Path, cpu_tokens: list[list[int]]) -> None:
    on_gpu = Engine(LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV, device="cuda"))
    assert on_gpu.executor.model.device.type == "cuda"  # type: ignore[attr-defined]
    assert greedy_tokens(on_gpu) == cpu_tokens


@pytest.mark.gpu
def test_cluster_with_fractional_gpus(ray_session, tiny_hf: Path, cpu_tokens: list[list[int]]) -> None:
    from cluster.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=1, expert_shards=2, gpus_per_attention_replica=0.3,
                           gpus_per_expert_shard=0.3, step_timeout_s=120)
    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV)
    assert {a.device for a in executor.topology() if a.role != "router"} == {"cuda"}
    assert greedy_tokens(Engine(executor)) == cpu_tokens


@pytest.mark.gpu
def test_nccl_between_actors_with_whole_gpus(ray_session, tiny_hf: Path, cpu_tokens: list[list[int]]) -> None:
    """--transport auto takes NCCL between actors that each own a whole GPU: the replica, the router
    and both shards here (4 GPUs); the engine's own channels stay shared memory."""
    import torch

    from cluster.cluster_executor import ClusterExecutor

    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs: one per actor")
    config = ClusterConfig(attention_replicas=1, expert_shards=2, gpus_per_attention_replica=1,
                           gpus_per_expert_shard=1, gpus_per_router=1, transport="nccl", step_timeout_s=120)
    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV)
    assert greedy_tokens(Engine(executor)) == cpu_tokens
