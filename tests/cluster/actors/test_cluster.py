"""The cluster engine on Ray actors gives the local engine's output, token for token."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from cluster.config import ClusterConfig, KVSpec, ModelSource, expert_bounds
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from model_shards import grammar
from model_shards.requests import Completion
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import decode
from tests.cluster.reference import local_completions

KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)
LENGTHS = (3, 17, 40, 130, 200, 9, 64, 5)  # 8 prompts, some longer than the sliding window
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def reference(tiny_hf: Path) -> list[Completion]:
    return local_completions(tiny_hf, prompts(), GREEDY, KV)


@pytest.fixture(scope="module")
def cluster(ray_session, tiny_hf: Path):
    from cluster.actors.cluster_executor import ClusterExecutor

    # two micro-batches per replica: its groups' attention and MoE alternate (the tcp test below runs one)
    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"),
                               ClusterConfig(attention_replicas=2, expert_shards=3, micro_batches=2,
                                             threads_per_router=2, step_timeout_s=30), KV)
    engine = Engine(executor)
    yield engine
    engine.shutdown()


def assert_same(reference: list[Completion], outs: list[Completion], tolerance: float = 1e-4) -> None:
    for ref, out in zip(reference, outs):
        assert out.token_ids == ref.token_ids
        assert max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)) < tolerance


def test_cluster_matches_local_engine(cluster: Engine, reference: list[Completion]) -> None:
    assert_same(reference, cluster.generate(prompts(), GREEDY, timeout=120))


def test_penalties_filters_and_grammars_on_the_cluster(cluster: Engine, tiny_hf: Path, vocab: Path) -> None:
    params = [SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=2.0, logit_bias=((42, 40.0),)),
              SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=1.8, min_tokens=4),
              SamplingParams(max_tokens=16, temperature=1.2, seed=5, top_k=20, min_p=0.05),
              SamplingParams(max_tokens=16, temperature=1.0, seed=2, stop_token_ids=(200002,),
                             grammar=grammar.regex(r"[a-z]{3,6}-\d{2}"))]  # a mask from the engine, per step
    local = Engine(LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV))
    try:
        expected = local.generate(prompts()[:4], params)
    finally:
        local.shutdown()
    assert [o.token_ids for o in cluster.generate(prompts()[:4], params, timeout=120)] == \
        [o.token_ids for o in expected]
    assert re.fullmatch(r"[a-z]{3,6}-\d{2}", decode(expected[3].token_ids[:-1]))


def test_topology_one_process_per_actor_and_every_expert_once(cluster: Engine) -> None:
    topology = cluster.executor.topology()
    roles = [a.role for a in topology]
    assert roles.count("attention_replica") == 2 and roles.count("router") == 1 and roles.count("expert_shard") == 3
    pids = [a.pid for a in topology]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    owned = sorted(e for a in topology if a.role == "expert_shard" for e in range(*a.experts))
    assert owned == list(range(cluster.model_config.num_experts))
    # torch threads: --cpus-per-actor (1) unless the role's own option says otherwise
    assert {a.role: a.threads for a in topology} == {"attention_replica": 1, "router": 2, "expert_shard": 1}


def test_actor_processes_are_named_by_role(cluster: Engine) -> None:
    titles = {"attention_replica": "ray::AttentionReplicaActor", "router": "ray::RouterActor",
              "expert_shard": "ray::ExpertShardActor"}
    for actor in cluster.executor.topology():
        cmdline = Path(f"/proc/{actor.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert cmdline.startswith(titles[actor.role]), cmdline  # what ps and Ray's tools show


def test_running_cluster_leaves_no_names_in_dev_shm(cluster: Engine) -> None:
    """Every ring is connected and unnamed, so killing any process (SIGKILL included) cannot leak one."""
    uid = cluster.executor._uid
    assert cluster.generate([prompts()[0]], SamplingParams(max_tokens=2, temperature=0.0), timeout=60)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"gptoss-{uid}-")]


def test_router_counts_every_routed_token(cluster: Engine) -> None:
    before = sum(cluster.executor.stats().router.expert_tokens)
    out = cluster.generate([prompts()[1]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    after = sum(cluster.executor.stats().router.expert_tokens)
    tokens_run = len(prompts()[1]) - out.cached_tokens + len(out.token_ids) - 1  # cached tokens are not run
    cfg = cluster.model_config
    assert after - before == tokens_run * cfg.num_hidden_layers * cfg.experts_per_token


def test_continuous_batching_and_abort_on_the_cluster(cluster: Engine) -> None:
    params = SamplingParams(max_tokens=40, temperature=0.0)
    steps_before = cluster.steps
    first = cluster.submit(prompts()[0], params)
    for _ in range(5):
        assert first.events.get(timeout=60).token is not None
    second = cluster.submit(prompts()[2], params)
    doomed = cluster.submit(prompts()[3], SamplingParams(max_tokens=500, temperature=0.0))
    assert doomed.events.get(timeout=60).token is not None
    cluster.abort(doomed.request_id)
    first.result(timeout=120), second.result(timeout=120)
    assert cluster.steps - steps_before < 40 + 40 - 10
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the replicas themselves report their KV free again
        usage = [r.kv_usage for r in cluster.executor.stats().replicas]
        if max(usage) == 0:
            break
        time.sleep(0.1)
    assert max(usage) == 0


def test_a_cached_prefix_draws_its_request_to_the_replica_that_holds_it(cluster: Engine) -> None:
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 199_998, (700,), generator=gen).tolist()
    first, second = prefix + [5, 6, 7], prefix + [8, 9]
    fresh = torch.randint(0, 199_998, (40,), generator=gen).tolist()  # cached nowhere: the idle replica 0 takes it
    blocker = cluster.submit(fresh, SamplingParams(max_tokens=500, temperature=0.0))
    assert blocker.events.get(timeout=60).token is not None  # replica 0 is busy: the first request goes to 1
    a = cluster.generate([first], GREEDY, timeout=120)[0]
    cluster.abort(blocker.request_id)
    while (end := blocker.events.get(timeout=60)).finish_reason is None:
        pass  # both replicas are idle again; a request without a cached prefix would go to replica 0
    assert end.replica == 0
    b = cluster.generate([second], GREEDY, timeout=120)[0]
    assert (a.replica, b.replica) == (1, 1)
    assert b.cached_tokens == 688
    with cluster._lock:
        cluster.scheduler.replicas[1].full.reset()  # forget replica 1's cache: the same prompt runs in full
    again = cluster.generate([second], GREEDY, timeout=120)[0]
    assert again.cached_tokens == 0 and again.token_ids == b.token_ids
    assert max(abs(x - y) for x, y in zip(again.logprobs, b.logprobs)) < 1e-4


def test_tcp_transport_uneven_split_and_packed_mxfp4(ray_session, tiny_hf: Path, reference: list[Completion]) -> None:
    from cluster.actors.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=1, expert_shards=2, expert_split=(3,), transport="tcp",
                           micro_batches=1, step_timeout_s=30)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32", keep_mxfp4=True), config, KV))
    try:
        assert [a.experts for a in engine.executor.topology() if a.role == "expert_shard"] == [[0, 3], [3, 16]]
        assert_same(reference, engine.generate(prompts(), GREEDY, timeout=120))
    finally:
        engine.shutdown()


def test_gloo_transport_gives_the_same_tokens(ray_session, tiny_hf: Path, reference: list[Completion]) -> None:
    """torch.distributed point-to-point (the NCCL code path, on CPU): every pair over one gloo group."""
    from cluster.actors.cluster_executor import ClusterExecutor

    config = ClusterConfig(attention_replicas=2, expert_shards=2, transport="gloo", step_timeout_s=30)
    engine = Engine(ClusterExecutor(ModelSource(str(tiny_hf), "float32"), config, KV))
    try:
        assert_same(reference, engine.generate(prompts(), GREEDY, timeout=120))
    finally:
        engine.shutdown()


def _fixed_steps(executor, prompts: list[list[int]], steps: int) -> list[list[tuple[int, int, float]]]:
    """All prompts (of one length) prefilled in one step, then `steps` decode steps of all of them:
    (seq, token, log-prob) per step. No scheduler in between, so both engines run the same batches
    (under the engine, which requests share a step depends on timing, and bf16 results on the batch)."""
    from cluster.bench.benchmark import chunk_steps, release_steps
    from cluster.engine.kv_manager import ReplicaKV

    cfg, spec = executor.config, executor.kv
    kv = [ReplicaKV(spec.num_blocks, spec.sliding_blocks(cfg.sliding_window), spec.block_size, cfg.sliding_window,
                    caching=False)]
    seqs = [(i, 0) for i in range(len(prompts))]
    for seq, _ in seqs:
        kv[0].admit(seq, [], 0, len(prompts[0]) + steps + 1)
    tokens, start, out = dict(enumerate(prompts)), 0, []
    for step in range(1 + steps):
        results = executor.execute(chunk_steps(seqs, tokens, start, step + 1, kv, SamplingParams(temperature=0.0)))
        sampled = sorted((x.seq_id, x.token, x.logprob) for r in results.values() for x in r.sampled)
        out.append(sampled)
        start += len(tokens[0])
        tokens = {seq: [token] for seq, token, _ in sampled}
    executor.execute(release_steps(seqs, steps + 2))
    return out


def test_bf16_with_one_shard_gives_the_local_engines_tokens_and_logprobs_bit_for_bit(ray_session,
                                                                                    tiny_hf: Path) -> None:
    """bf16: one shard holds every expert and takes the local engine's MoE paths (8 decode rows over
    most experts summed per token in two matmuls, tests/cluster/test_shard.py), so the same steps
    give the same bits."""
    from cluster.actors.cluster_executor import ClusterExecutor

    gen = torch.Generator().manual_seed(4)
    same_length = [torch.randint(0, 199_998, (24,), generator=gen).tolist() for _ in range(8)]
    local = LocalExecutor(ModelSource(str(tiny_hf), "bfloat16"), KV)
    try:
        expected = _fixed_steps(local, same_length, 4)
    finally:
        local.shutdown()
    config = ClusterConfig(attention_replicas=1, expert_shards=1, step_timeout_s=30)
    cluster = ClusterExecutor(ModelSource(str(tiny_hf), "bfloat16"), config, KV)
    try:
        assert _fixed_steps(cluster, same_length, 4) == expected
    finally:
        cluster.shutdown()


def test_expert_bounds() -> None:
    assert expert_bounds(16, 3) == ((0, 5), (5, 10), (10, 16))
    assert expert_bounds(16, 16)[-1] == (15, 16) and expert_bounds(16, 1) == ((0, 16),)
    assert expert_bounds(16, 3, (2, 15)) == ((0, 2), (2, 15), (15, 16))
    for shards in (0, 17):
        with pytest.raises(ValueError, match="between 1 and the number of experts"):
            expert_bounds(16, shards)
    with pytest.raises(ValueError, match="increasing"):
        expert_bounds(16, 3, (9, 4))


def test_a_short_request_is_not_stuck_behind_a_long_prefill_on_the_cluster(ray_session, tiny_hf: Path) -> None:
    """The same bound as on the local engine (test_engine.py): first token one step after arrival."""
    from cluster.actors.cluster_executor import ClusterExecutor
    from cluster.config import EngineConfig

    executor = ClusterExecutor(ModelSource(str(tiny_hf), "float32"), ClusterConfig(step_timeout_s=30), KV)
    engine = Engine(executor, EngineConfig(max_num_batched_tokens=64))
    try:
        gen = torch.Generator().manual_seed(9)
        long = engine.submit(torch.randint(0, 199_998, (1200,), generator=gen).tolist(),
                             SamplingParams(max_tokens=2, temperature=0.0))
        while engine.steps < 2:
            time.sleep(0.001)
        arrived_at = engine.steps
        short = engine.submit(prompts()[0], SamplingParams(max_tokens=1, temperature=0.0))
        assert short.events.get(timeout=60).token is not None
        assert engine.steps <= arrived_at + 2 < 1200 // 64
        assert long.result(timeout=120).token_ids
    finally:
        engine.shutdown()
