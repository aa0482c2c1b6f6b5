"""GPU paths (skipped without CUDA): the local engine on the GPU, and the cluster with fractional-GPU
actors sharing one GPU, both giving the CPU engine's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
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
    on_gpu = Engine(LocalExecutor(ModelSource(str(tiny_hf), "float32", device="cuda"), KV))
    assert on_gpu.executor.model.device.type == "cuda"  # type: ignore[attr-defined]
    assert greedy_tokens(on_gpu) == cpu_tokens


@pytest.mark.gpu
def test_decode_graphs_give_the_eager_tokens(tiny_hf: Path) -> None:
    """bf16 on CUDA: decode steps replay CUDA graphs (decode_graph.py) by default; --enforce-eager
    runs the same steps eagerly: the same greedy tokens."""
    source = ModelSource(str(tiny_hf), "bfloat16", device="cuda")
    graphed = LocalExecutor(source, KV)
    assert graphed.decoder is not None and graphed.decoder.graphs
    tokens = greedy_tokens(Engine(graphed))
    assert graphed.decoder._replays  # some bucket was captured
    assert greedy_tokens(Engine(LocalExecutor(source, KV, enforce_eager=True))) == tokens


@pytest.mark.gpu
def test_cluster_with_fractional_gpus(ray_session, tiny_hf: Path, cpu_tokens: list[list[int]]) -> None:
    from cluster.actors.cluster_executor import ClusterExecutor

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

    from cluster.actors.cluster_executor import ClusterExecutor

    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs: one per actor")
    config = ClusterConfig(attention_replicas=1, expert_shards=2, gpus_per_attention_replica=1,
                           gpus_per_expert_shard=1, gpus_per_router=1, transport="nccl", step_timeout_s=120)
    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV)
    assert greedy_tokens(Engine(executor)) == cpu_tokens


@pytest.mark.gpu
def test_a_shard_on_the_gpu_stages_a_new_placement(tiny_hf: Path) -> None:
    """Rebalancing on a GPU shard: the slices it reads join the stacks it holds on the device, and
    its answers match a CPU shard holding the same experts."""
    import torch

    from cluster.config import ShardSpec
    from cluster.balancing.eplb import balanced_placement, initial_placement, slot_counts
    from cluster.dataplane.messages import ShardRequest
    from cluster.actors.shard import ExpertShard

    source = ModelSource(str(tiny_hf), "float32")
    cfg = source.config()
    bounds = ((0, 8), (8, 16))
    start = initial_placement(bounds, slot_counts(bounds, 2, cfg.num_experts), cfg.num_hidden_layers)
    load = torch.ones(cfg.num_hidden_layers, cfg.num_experts)
    load[:, :4] = 100
    new = balanced_placement(load.numpy(), start)
    shards = [ExpertShard(ShardSpec(source, 0, (0, 8), start.shard(0), use_gpu=gpu)) for gpu in (True, False)]
    for shard in shards:
        assert shard.adopt(new) > 0
    slots = len(new.shard(0)[0])
    x = torch.randn(3, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    request = ShardRequest(1, 0, 0, x, torch.tensor([0, 1, 2]), torch.tensor([0, slots - 1, 1]),
                           torch.tensor([0.5, 0.25, 1.0]), torch.tensor([0]), torch.tensor([3]), new.version)
    (_, on_gpu), (_, on_cpu) = (shard.compute(request)[0] for shard in shards)
    assert shards[0].current.weights[0].gate_up_bias.device.type == "cuda"
    torch.testing.assert_close(on_gpu.weighted.cpu(), on_cpu.weighted, rtol=1e-4, atol=1e-4)
