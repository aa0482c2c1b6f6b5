"""Rebalancing experts while serving (rebalance.py): placements switch at step boundaries while 8
requests generate, every output stays that of an undisturbed run, shards read only the slices they
gain, every routed assignment is computed once, and a shard killed during or after a rebalance comes
back holding the current placement."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.config import ClusterConfig, EngineConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.balancing.eplb import ExpertPlacement, balanced_placement, moved
from cluster.telemetry import ExecutorStats, shard_imbalance
from model_shards.random_checkpoint import make_tiny
from model_shards.requests import Completion
from model_shards.sampling import SamplingParams
from tests.cluster.reference import local_completions
from tests.cluster.actors.test_failures import collect, prompts

KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)
PARAMS = [SamplingParams(max_tokens=64, temperature=0.0)] * 6 + \
    [SamplingParams(max_tokens=64, temperature=0.9, seed=s) for s in range(2)]
SHARDS = 2


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with hot experts 0-3 in every layer (all on shard 0 of the even split)."""
    return make_tiny(tmp_path_factory.mktemp("tiny-skewed"), "tiny", "hf", True, seed=0, router_skew=4.0)


@pytest.fixture(scope="module")
def undisturbed(skewed: Path) -> list[Completion]:
    return local_completions(skewed, prompts(), PARAMS, KV)


@pytest.fixture(scope="module")
def cluster(ray_session, skewed: Path):
    from cluster.actors.cluster_executor import ClusterExecutor

    # rebalancing on request only, so that the test knows every placement (test 2 turns the interval on)
    config = ClusterConfig(expert_shards=SHARDS, redundant_experts=2, micro_batches=2, step_timeout_s=3.0)
    # no prefix caching: every test's tokens are all computed, so the counts below are exact
    engine = Engine(ClusterExecutor(ModelSource(str(skewed), "float32"), config, KV), EngineConfig(prefix_caching=False))
    yield engine
    engine.shutdown()


def hot_load(cfg, hot: list[int]) -> np.ndarray:
    load = np.ones((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    load[:, hot] = 100
    return load


def one_shard_hot(engine: Engine) -> np.ndarray:
    """A load whose four hot experts all live on shard 0 only (in the current placement, whose layers
    are alike here): a rebalance by it certainly moves experts."""
    cfg, slots = engine.executor.config, engine.executor.balancer.placement.layers[0]
    return hot_load(cfg, [e for e in slots[0] if all(e not in other for other in slots[1:])][:4])


def wait_for_switches(engine: Engine, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.executor.balancer.switches < count:
        assert time.monotonic() < deadline, "the placement did not switch"
        time.sleep(0.01)


def check_holdings(stats: ExecutorStats, placement: ExpertPlacement) -> None:
    for j, shard in enumerate(stats.shards):
        assert shard.placement == placement.version
        assert shard.slots == placement.shard(j)


def test_the_interval_rebalances_by_routed_load_and_evens_the_shards(cluster: Engine,
                                                                     undisturbed: list[Completion]) -> None:
    """At start the hot experts 0-3 all live on shard 0: the interval rebalances by the router's real
    counts, and then the shards' routed loads are even (the replicated hot experts split theirs)."""
    ex = cluster.executor
    switches = ex.balancer.switches
    ex.balancer.interval = 3
    try:
        outs = cluster.generate(prompts(), PARAMS)
    finally:
        ex.balancer.interval = 0
    assert ex.balancer.switches > switches
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
    before = ex.stats()
    outs = cluster.generate(prompts(), PARAMS)  # on the balanced placement
    after = ex.stats()
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
    loads = [[n - m for n, m in zip(a, b)] for a, b in zip(after.router.shard_tokens, before.router.shard_tokens)]
    assert shard_imbalance(loads)[1] <= 1.25
    assert any(len(set(layer[0]) & set(layer[1])) for layer in ex.balancer.placement.layers)  # copies exist


def test_rebalancing_twice_while_8_requests_generate(cluster: Engine, undisturbed: list[Completion]) -> None:
    ex, cfg = cluster.executor, cluster.executor.config
    start, before = ex.balancer.placement, ex.stats()
    slice_bytes = before.shards[0].bytes_read // before.shards[0].slices_read  # every slice has one size
    handles = [cluster.submit(p, sp) for p, sp in zip(prompts(), PARAMS)]
    token = handles[0].events.get(timeout=120).token
    switches = ex.balancer.switches
    ex.balancer.request(load := one_shard_hot(cluster))
    first = balanced_placement(load, start)
    wait_for_switches(cluster, switches + 1)
    ex.balancer.request(load := one_shard_hot(cluster))
    second = balanced_placement(load, first)
    wait_for_switches(cluster, switches + 2)
    outs = [collect(h, [token] if i == 0 else []) for i, h in enumerate(handles)]
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
    assert ex.balancer.placement == second
    after = ex.stats()
    check_holdings(after, second)
    for j, (b, a) in enumerate(zip(before.shards, after.shards)):
        gained = len(moved(start, first, j)) + len(moved(first, second, j))
        assert gained > 0
        assert a.slices_read - b.slices_read == gained  # only its new slices ...
        assert a.bytes_read - b.bytes_read == gained * slice_bytes  # ... and nothing else of the file
    # every routed assignment computed exactly once, over the whole run
    routed = sum(map(sum, after.router.shard_tokens)) - sum(map(sum, before.router.shard_tokens))
    computed = sum(a.assignments - b.assignments for b, a in zip(before.shards, after.shards))
    tokens_run = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts(), outs))  # prompt + all but the last
    assert routed == computed == tokens_run * cfg.experts_per_token * cfg.num_hidden_layers


@pytest.mark.parametrize("when", ["after", "during"])
def test_a_shard_killed_around_a_rebalance_comes_back_with_the_current_placement(
        cluster: Engine, undisturbed: list[Completion], when: str) -> None:
    ex = cluster.executor
    failures, switches = len(cluster.failures), ex.balancer.switches
    handles = [cluster.submit(p, sp) for p, sp in zip(prompts(), PARAMS)]
    token = handles[0].events.get(timeout=120).token
    ex.balancer.request(one_shard_hot(cluster))
    if when == "after":
        wait_for_switches(cluster, switches + 1)
    pid = next(a.pid for a in ex.topology() if a.role == "expert_shard" and a.index == 1)
    os.kill(pid, signal.SIGKILL)
    outs = [collect(h, [token] if i == 0 else []) for i, h in enumerate(handles)]
    assert [o.token_ids for o in outs] == [u.token_ids for u in undisturbed]
    assert len(cluster.failures) > failures
    check_holdings(ex.stats(), ex.balancer.placement)
    assert ex.stats().router.placement == ex.balancer.placement.version


def test_a_rebalance_that_gains_little_moves_nothing(cluster: Engine) -> None:
    """An evenly routed load, or the load the placement was made for, reads no slice."""
    ex, cfg = cluster.executor, cluster.executor.config
    ex.balancer.request(load := one_shard_hot(cluster))
    cluster.generate(prompts()[:2], PARAMS[:2])
    switches, reads = ex.balancer.switches, [s.slices_read for s in ex.stats().shards]
    for load in (load, np.ones((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)):
        ex.balancer.request(load)
        cluster.generate(prompts()[:2], PARAMS[:2])
    assert ex.balancer.switches == switches
    assert [s.slices_read for s in ex.stats().shards] == reads
