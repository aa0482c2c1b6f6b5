"""A replica's step in micro-batches: the groups, the order their MoE inputs leave in, and results
that do not depend on the split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import KVSpec, ModelSource
from cluster.engine.executor import LocalExecutor
from cluster.engine.kv_manager import ReplicaKV
from cluster.dataplane.messages import ChunkPlan, ReplicaStep
from cluster.engine.step import micro_batches, run_micro_batched, run_replica_step
from model_shards.kv_cache import BlockUpdate
from model_shards.logits import Histories
from model_shards.sampling import SamplingParams

KV = KVSpec(num_blocks=64, block_size=16, max_seqs=8)
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)


def chunk(seq_id: int, tokens: int) -> ChunkPlan:
    return ChunkPlan(seq_id, 0, [1] * tokens, BlockUpdate(), True, GREEDY, 0, 0)


@pytest.mark.parametrize("lengths,m", [([1] * 8, 2), ([1] * 7, 3), ([100, 1, 1], 2), ([1, 1, 100], 2), ([5], 4),
                                       ([3, 3], 8), ([40, 30, 20, 10], 2)])
def test_groups_are_contiguous_nonempty_and_balanced(lengths: list[int], m: int) -> None:
    chunks = [chunk(i, n) for i, n in enumerate(lengths)]
    groups = micro_batches(chunks, m)
    assert [c for g in groups for c in g] == chunks  # contiguous, in order, every chunk once
    assert len(groups) == min(m, len(chunks)) and all(groups)
    if len(set(lengths)) == 1:  # equal chunks: sizes differ by at most one
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def local(tiny_hf: Path) -> LocalExecutor:
    return LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV)


def _step(local: LocalExecutor, lengths: list[int], groups: int) -> ReplicaStep:
    cfg = local.config
    kv = ReplicaKV(KV.num_blocks, KV.sliding_blocks(cfg.sliding_window), KV.block_size, cfg.sliding_window,
                   caching=False)
    gen = torch.Generator().manual_seed(1)
    chunks = []
    for seq_id, n in enumerate(lengths):
        kv.admit(seq_id, [], 0, n + 1)
        tokens = torch.randint(0, 199_998, (n,), generator=gen).tolist()
        chunks.append(ChunkPlan(seq_id, 0, tokens, kv.plan(seq_id, 0, n), True, GREEDY, 0, 0))
    return ReplicaStep(1, [], chunks, groups)


def test_micro_batches_send_in_layer_group_order_and_give_the_unsplit_result(local: LocalExecutor) -> None:
    lengths = [3, 17, 40, 130, 9, 5]
    whole = run_replica_step(local.model, local.core.new_cache(), _step(local, lengths, 1), histories=Histories())
    sent: list[tuple[int, int]] = []
    inputs: dict[int, torch.Tensor] = {}

    def send(layer: int, m: int, t: torch.Tensor) -> None:
        sent.append((layer, m))
        inputs[m] = t

    def recv(layer: int, m: int) -> torch.Tensor:
        assert sent[-1][0] >= layer  # every group sent this layer's input before any waits for the next
        return local.model.local_moe(layer, inputs.pop(m))

    split = run_micro_batched(local.model, local.core.new_cache(), _step(local, lengths, 3), send, recv, Histories())
    layers = local.config.num_hidden_layers
    assert sent == [(layer, m) for layer in range(layers) for m in range(3)]
    assert [s.token for s in split] == [s.token for s in whole]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(split, whole)) < 1e-4  # type: ignore[operator]
