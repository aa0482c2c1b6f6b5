"""Live resize (resize.py) under a steady stream of requests: attention replicas 1 -> 2 -> 1 and expert
shards 2 -> 3 -> 2, each while requests are in flight; no request fails and every output (tokens and
log-probs, greedy and seeded sampling) equals the local reference. A resize whose resources never
arrive times out and leaves the engine serving on the old plane. With the autoscaler, a burst that
fills the KV cache adds a replica, which goes again after the burst."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cluster.balancing.eplb import moved
from cluster.config import ClusterConfig, EngineConfig, KVSpec, ModelSource
from cluster.engine.autoscale import AutoscalePolicy, Autoscaler
from cluster.engine.engine import Engine
from cluster.engine.executor import ResizeOutcome, ResizeRefused
from model_shards.requests import Completion
from model_shards.sampling import SamplingParams
from tests.cluster.actors.test_failures import prompts
from tests.cluster.reference import local_completions

KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)
PARAMS = [SamplingParams(max_tokens=24, temperature=0.0)] * 4 + \
    [SamplingParams(max_tokens=24, temperature=0.9, seed=s) for s in range(4)]


@pytest.fixture(scope="module")
def reference(tiny_hf: Path) -> list[Completion]:
    return local_completions(tiny_hf, prompts(), PARAMS, KV)


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_hf: Path):
    from cluster.actors.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=1, expert_shards=2, micro_batches=2, step_timeout_s=10.0)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV))
    yield engine
    engine.shutdown()


@dataclasses.dataclass
class Finished:
    index: int  # into prompts() and PARAMS
    submitted: float
    ended: float
    completion: Completion


class Stream:
    """Keeps `width` requests in flight (the 8 prompts in turn) until stopped."""

    def __init__(self, engine: Engine, width: int = 4) -> None:
        self.engine, self.width = engine, width
        self.done: list[Finished] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(width)]
        for t in self._threads:
            t.start()

    def _run(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            index = i % len(PARAMS)
            submitted = time.monotonic()
            try:
                out = self.engine.submit(prompts()[index], PARAMS[index]).result(timeout=240)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            self.done.append(Finished(index, submitted, time.monotonic(), out))
            i += self.width

    def stop(self) -> list[Finished]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=300)
        return self.done


def resize(engine: Engine, replicas: int | None = None, shards: int | None = None) -> tuple[ResizeOutcome, float]:
    outcome = engine.scale(replicas, shards).result(timeout=180)
    return outcome, time.monotonic()


def scale_back(engine: Engine, stream: Stream, reference: list[Completion], t_up: float,
               **counts: int) -> ResizeOutcome:
    """The second resize of a round trip while the stream runs, then the stream stopped: no request
    failed and every output is the reference's. -> the second resize's outcome."""
    down, t_down = resize(engine, **counts)
    time.sleep(0.5)
    finished = stream.stop()
    assert not stream.errors, stream.errors
    check(finished, reference, [t_up, t_down])
    return down


def check(finished: list[Finished], reference: list[Completion], switched_at: list[float]) -> None:
    assert finished
    for f in finished:
        ref = reference[f.index]
        assert f.completion.token_ids == ref.token_ids, f.index
        assert f.completion.logprobs == pytest.approx(ref.logprobs, abs=1e-4), f.index
    for t in switched_at:  # each switch happened with requests in flight
        assert any(f.submitted < t < f.ended for f in finished), t


def test_attention_replicas_1_2_1_while_requests_stream(cluster: Engine, reference: list[Completion]) -> None:
    stream = Stream(cluster)
    time.sleep(1.0)
    up, t_up = resize(cluster, replicas=2)
    assert up.ok and up.replicas == (1, 2) and cluster.counts() == (2, 2), up.error
    assert {a.index for a in cluster.executor.topology() if a.role == "attention_replica"} == {0, 1}
    deadline = time.monotonic() + 30
    while not any(s.replica == 1 for s in cluster.scheduler.admitted):  # the new replica serves
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)
    down = scale_back(cluster, stream, reference, t_up, replicas=1)
    assert down.ok and down.replicas == (2, 1) and cluster.counts() == (1, 2), down.error
    assert [a.role for a in cluster.executor.topology()].count("attention_replica") == 1


def test_expert_shards_2_3_2_while_requests_stream(cluster: Engine, reference: list[Completion]) -> None:
    ex = cluster.executor
    start, before = ex.balancer.placement, ex.stats()
    stream = Stream(cluster)
    time.sleep(1.0)
    up, t_up = resize(cluster, shards=3)
    assert up.ok and up.shards == (2, 3) and cluster.counts() == (1, 3), up.error
    new, after = ex.balancer.placement, ex.stats()
    for j in range(2):  # the survivors read only the slices they gained
        assert after.shards[j].slices_read - before.shards[j].slices_read == len(moved(start, new, j))
    assert after.shards[2].slices_read == sum(map(len, new.shard(2)))  # the new shard: its own, once
    assert sum(len(moved(start, new, j)) for j in range(2)) > 0  # shard 1 takes over part of shard 0's range
    shards = sorted((a.index, tuple(a.experts)) for a in cluster.executor.topology() if a.role == "expert_shard")
    e = cluster.model_config.num_experts
    assert shards == [(j, (j * e // 3, (j + 1) * e // 3)) for j in range(3)]
    time.sleep(1.0)
    # every shard switched to the new placement with its first request (the survivors had staged it)
    stats = cluster.executor.stats()
    assert [s.placement for s in stats.shards] == [cluster.executor.balancer.placement.version] * 3
    down = scale_back(cluster, stream, reference, t_up, shards=2)
    assert down.ok and down.shards == (3, 2) and cluster.counts() == (1, 2), down.error
    assert len(cluster.executor.stats().shards) == 2


def test_a_resize_that_cannot_be_placed_times_out_and_serving_goes_on(
        cluster: Engine, reference: list[Completion], caplog: pytest.LogCaptureFixture) -> None:
    ex = cluster.executor
    config = ex.cluster
    ex.cluster = dataclasses.replace(config, attention_replica_resources={"gptoss_nowhere": 1.0})  # never arrives
    try:
        stream = Stream(cluster, width=2)
        with caplog.at_level("WARNING", logger="cluster.actors.resize"):
            outcome = cluster.scale(2, timeout_s=3.0).result(timeout=60)
        finished = stream.stop()
    finally:
        ex.cluster = config
    assert not outcome.ok and "timed out" in outcome.error and "resources did not arrive" in outcome.error
    assert outcome.replicas == (1, 1) and cluster.counts() == (1, 2)
    assert "serving on the old plane" in caplog.text
    assert not stream.errors
    check(finished, reference, [])
    assert [a.role for a in ex.topology()].count("attention_replica") == 1
    import ray

    assert not [pg for pg in ray.util.placement_group_table().values()
                if pg["state"] not in ("REMOVED",) and any("gptoss_nowhere" in b for b in pg["bundles"].values())]


def test_counts_that_cannot_work_are_refused_at_once(cluster: Engine) -> None:
    for replicas, shards in ((0, None), (None, 0), (None, cluster.model_config.num_experts + 1)):
        with pytest.raises(ResizeRefused):
            cluster.scale(replicas, shards).result(timeout=30)
    same = cluster.scale().result(timeout=30)
    assert same.ok and same.seconds == 0.0 and cluster.counts() == (1, 2)


def test_a_failure_while_a_resize_is_pending_cancels_it(cluster: Engine, reference: list[Completion]) -> None:
    """The survivors have staged the 3-shard placement and the new shard waits for its resource when
    shard 1 dies: the recovery cancels the resize, every actor holds the old placement again."""
    ex = cluster.executor
    config = ex.cluster
    ex.cluster = dataclasses.replace(config, expert_shard_resources={"gptoss_nowhere": 1.0})
    try:
        stream = Stream(cluster, width=2)
        time.sleep(0.5)
        done = cluster.scale(expert_shards=3, timeout_s=120)
        time.sleep(1.0)
        failures = len(cluster.failures)
        os.kill(next(a.pid for a in ex.topology() if a.role == "expert_shard" and a.index == 1), signal.SIGKILL)
        outcome = done.result(timeout=120)
        finished = stream.stop()
    finally:
        ex.cluster = config
    assert not outcome.ok and outcome.error == "a recovery interrupted it" and outcome.shards == (2, 2)
    assert len(cluster.failures) > failures and cluster.counts() == (1, 2)
    assert not stream.errors
    check(finished, reference, [])
    stats = ex.stats()
    assert [s.placement for s in stats.shards] == [ex.balancer.placement.version] * 2
    assert stats.router.placement == ex.balancer.placement.version and not ex.balancer.paused


def test_a_switch_that_fails_half_way_recovers_on_the_new_plane(cluster: Engine, reference: list[Completion],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.engine.executor import ExecutorFailure

    ex = cluster.executor
    real = ex.restart_plane
    calls: list[int] = []

    def fails_once() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ExecutorFailure("the new plane could not start")
        real()

    monkeypatch.setattr(ex, "restart_plane", fails_once)
    stream = Stream(cluster, width=2)
    failures = len(cluster.failures)
    outcome = cluster.scale(2).result(timeout=120)
    monkeypatch.undo()
    finished = stream.stop()
    assert outcome.ok and outcome.replicas == (1, 2) and cluster.counts() == (2, 2) and len(calls) == 2
    assert cluster.failures[failures][1] == "the new plane could not start"
    assert not stream.errors
    check(finished, reference, [])
    assert cluster.scale(1).result(timeout=120).ok and cluster.counts() == (1, 2)


def test_autoscale_adds_a_replica_for_a_burst_and_removes_it_after(ray_session, tiny_hf: Path) -> None:
    """A KV cache of 8 blocks holds one of these requests: a burst of 8 waits, so a replica comes
    (0.5 s up-delay), and goes once the burst is over (1 s down-delay)."""
    from cluster.actors.cluster_executor import ClusterExecutor

    kv = KVSpec(num_blocks=8, block_size=16, max_seqs=4)
    params = [SamplingParams(max_tokens=100, temperature=0.0)] * 8
    burst = [p[:20] for p in prompts()]
    expected = local_completions(tiny_hf, burst, params, kv)
    policy = AutoscalePolicy(min_replicas=1, max_replicas=2, min_shards=1, max_shards=1, upscale_delay_s=0.5,
                             downscale_delay_s=1.0)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32"), ClusterConfig(), kv), EngineConfig(),
                    Autoscaler(policy))
    try:
        outs = engine.generate(burst, params, timeout=240)
        assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
        deadline = time.monotonic() + 120
        while not engine.resizes or engine.counts() != (1, 1):  # up (maybe only as the burst ends), then down
            assert time.monotonic() < deadline, engine.resizes
            time.sleep(0.1)
        up, down = engine.resizes[0], engine.resizes[-1]
        # the burst fills the one replica's KV: requests wait (or, at its very end, the last one fills it)
        assert up.ok and up.replicas == (1, 2), engine.resizes
        assert up.reason in ("autoscale: requests waiting", "autoscale: KV usage high"), engine.resizes
        assert down.ok and down.replicas == (2, 1) and down.reason == "autoscale: KV usage low", engine.resizes
        assert all(r.ok for r in engine.resizes), engine.resizes
    finally:
        engine.shutdown()
