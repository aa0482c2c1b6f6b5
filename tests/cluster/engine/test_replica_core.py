"""One replica core (weights, KV cache, penalty histories, warm-up, reset) behind both the local
executor and the attention-replica actor: same weights, same cache, same reset."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.actors.replica import AttentionReplica
from cluster.config import KVSpec, ModelSource, ReplicaSpec
from cluster.engine.executor import LocalExecutor
from cluster.engine.replica_core import ReplicaCore

KV = KVSpec(num_blocks=32, block_size=16, max_seqs=4, max_step_tokens=256)


def test_the_local_executor_and_the_replica_actor_hold_the_same_core(tiny_hf: Path) -> None:
    source = ModelSource(str(tiny_hf), "float32")
    local = LocalExecutor(source, KV, threads=1)
    replica = AttentionReplica(ReplicaSpec(source, 0, KV))  # the actor's object, without Ray
    assert isinstance(local.core, ReplicaCore) and isinstance(replica.core, ReplicaCore)
    mine, theirs = local.core.model.weights, replica.core.model.weights
    assert len(mine.experts) == mine.config.num_hidden_layers and theirs.experts == [] and theirs.routers == []
    assert torch.equal(mine.attention[1].qkv.weight, theirs.attention[1].qkv.weight)
    assert torch.equal(mine.globals.unembedding.weight, theirs.globals.unembedding.weight)
    for core in (local.core, replica.core):
        assert core.usage() == 0 and core.kv_spec == KV


def test_reset_forgets_every_sequence(tiny_hf: Path) -> None:
    core = ReplicaCore(ModelSource(str(tiny_hf), "float32"), KV, "cpu", with_experts=False)
    core.histories.start(7, [1, 2, 3], [4])
    before = core.cache
    core.reset()
    assert core.cache is not before and core.usage() == 0
    assert core.histories.get(7) is None
