"""Faults while 8 requests generate: a killed expert shard, router or attention replica, and a hung
shard, with two micro-batches per replica in flight. Every request completes with exactly the output
of an undisturbed run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.events import RequestHandle
from model_shards.requests import Completion
from model_shards.sampling import SamplingParams
from tests.cluster.reference import local_completions

KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)
STEP_TIMEOUT_S = 3.0
# Greedy and seeded sampling: resuming must reproduce both exactly.
PARAMS = [SamplingParams(max_tokens=40, temperature=0.0)] * 4 + \
    [SamplingParams(max_tokens=40, temperature=0.9, seed=s) for s in range(4)]


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in (3, 17, 40, 130, 200, 9, 64, 5)]


@pytest.fixture(scope="module")
def undisturbed(tiny_hf: Path) -> list[Completion]:
    return local_completions(tiny_hf, prompts(), PARAMS, KV)


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_hf: Path):
    from cluster.actors.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=2, expert_shards=3, micro_batches=2, step_timeout_s=STEP_TIMEOUT_S)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV))
    yield engine
    engine.shutdown()


def collect(handle: RequestHandle, first: list[int]) -> Completion:
    tokens, logprobs = list(first), []
    while True:
        event = handle.events.get(timeout=240)
        if event.token is not None:
            tokens.append(event.token)
        if event.finish_reason is not None:
            assert event.finish_reason == "length", event.error
            return Completion(handle.prompt_ids, tokens, logprobs, event.finish_reason)


def disturb(engine: Engine, role: str, index: int, sig: signal.Signals) -> tuple[list[Completion], float]:
    pid = next(a.pid for a in engine.executor.topology() if a.role == role and a.index == index)
    handles = [engine.submit(p, sp) for p, sp in zip(prompts(), PARAMS)]
    first = handles[0].events.get(timeout=120)  # generation is under way
    assert first.token is not None
    sent = time.monotonic()
    os.kill(pid, sig)
    return [collect(h, [first.token] if i == 0 else []) for i, h in enumerate(handles)], sent


@pytest.mark.parametrize("role, index", [("expert_shard", 1), ("router", 0), ("attention_replica", 0)])
def test_killed_actor_is_restarted_and_requests_complete_identically(
        cluster: Engine, undisturbed: list[Completion], role: str, index: int) -> None:
    failures = len(cluster.failures)
    outs, _ = disturb(cluster, role, index, signal.SIGKILL)
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
    assert len(cluster.failures) > failures
    assert "down" in cluster.failures[failures][1]
    assert any(a.role == role for a in cluster.executor.topology())


def test_hung_shard_is_noticed_within_the_timeout(cluster: Engine, undisturbed: list[Completion]) -> None:
    failures = len(cluster.failures)
    outs, stopped_at = disturb(cluster, "expert_shard", 2, signal.SIGSTOP)  # alive, but never answers
    noticed_at, reason = cluster.failures[failures]
    assert "timed out" in reason
    assert noticed_at - stopped_at < STEP_TIMEOUT_S + 1.5
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]


def test_killed_shard_on_the_gloo_transport(ray_session, tiny_hf: Path, undisturbed: list[Completion]) -> None:
    """The torch.distributed channels fail and come back like the rings: a lost peer ends the
    receiving threads with an error, recovery builds a new group for the new epoch."""
    from cluster.actors.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=1, expert_shards=2, transport="gloo", step_timeout_s=STEP_TIMEOUT_S)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV))
    try:
        outs, _ = disturb(engine, "expert_shard", 0, signal.SIGKILL)
        assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
        assert engine.failures and "down" in engine.failures[0][1]
    finally:
        engine.shutdown()
