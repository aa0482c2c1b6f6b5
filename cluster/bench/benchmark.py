"""Decode benchmark over any executor: B sequences of `input_len` random tokens are prefilled in one
step, then `steps` decode steps are timed one by one (what a served token costs: the forward pass,
sampling, and for the cluster every message of the step). The same code drives the local and the
cluster executor, so their step times compare directly. With expert rebalancing on (--eplb-interval),
the same prompts run again after a rebalance by the load they routed: a second row, "cluster+eplb",
beside the initial placement's, at the same positions."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from cluster.engine.executor import Executor
from cluster.engine.kv_manager import ReplicaKV
from cluster.dataplane.messages import ChunkPlan, ReplicaStep
from cluster.telemetry import RouterStats, shard_imbalance
from model_shards.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=1 << 20, temperature=0.0, logprobs=False)  # what a served request asks by default


@dataclass
class DecodeRow:
    engine: str
    batch_size: int
    prefill_ms: float  # the one step that prefills all B prompts
    step_ms_p50: float
    step_ms_p90: float
    tokens_per_s: float  # B / median step
    moe_wait_us_per_layer: float | None = None  # cluster: a replica's wait for the MoE result, per layer
    replica_us_per_layer: float | None = None  # that replica's own compute (everything but the wait), per layer
    data_plane_us_per_layer: float | None = None  # that wait minus router work and the slowest shard
    router_us_per_layer: float | None = None  # the router's own compute (routing, dispatch, combine)
    shard_us_per_layer: float | None = None  # the slowest shard's compute
    shard_imbalance: float | None = None  # cluster: busiest shard's routed load over the mean, timed steps
    # one more decode step, counted (syncs.py): the most host syncs any one process made in it, and
    # kernel-launching ops per layer summed over the processes; per process, its syncs
    host_syncs_per_step: int | None = None
    ops_per_layer: float | None = None
    syncs_by_process: dict[str, int] | None = None


def chunk_steps(seqs: list[tuple[int, int]], tokens: dict[int, list[int]], start: int, step_id: int,
                kv: list[ReplicaKV], params: SamplingParams = GREEDY) -> dict[int, ReplicaStep]:
    """seqs [(seq, replica)]: every sequence runs `tokens[seq]` at position `start` and samples the
    next token: one step of fixed makeup for `Executor.execute` (no scheduler in between)."""
    by_replica: dict[int, list[ChunkPlan]] = {}
    for seq, replica in seqs:
        blocks = kv[replica].plan(seq, start, start + len(tokens[seq]))
        by_replica.setdefault(replica, []).append(ChunkPlan(seq, start, tokens[seq], blocks, True, params, 0, 0))
    return {r: ReplicaStep(step_id, [], chunks) for r, chunks in by_replica.items()}


def release_steps(seqs: list[tuple[int, int]], step_id: int) -> dict[int, ReplicaStep]:
    """A step that only frees the sequences' KV on their replicas."""
    replicas = sorted({r for _, r in seqs})
    return {r: ReplicaStep(step_id, [s for s, owner in seqs if owner == r], []) for r in replicas}


def bench_decode(ex: Executor, label: str, batch_sizes: list[int], input_len: int, steps: int, warmup: int = 2,
                 seed: int = 0) -> list[DecodeRow]:
    cfg = ex.config
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in batch_sizes:
        prompts = [torch.randint(0, cfg.vocab_size, (input_len,), generator=gen).tolist() for _ in range(b)]
        rows.append(_run(ex, label, prompts, steps, warmup, 1_000_000 * b))
        # With --eplb-interval: the same prompts again once the experts are placed by the load the
        # first run routed (its prefill switches), at the same positions: side by side.
        if ex.balancing and ex.rebalance():
            rows.append(_run(ex, f"{label}+eplb", prompts, steps, warmup, 1_000_000 * b + 500_000))
    return rows


def _run(ex: Executor, label: str, prompts: list[list[int]], steps: int, warmup: int, step_id: int) -> DecodeRow:
    """Prefill `prompts` in one step, decode `warmup` steps, time `steps` steps, count one more
    (Executor.counted); release them."""
    cfg, spec, b, input_len = ex.config, ex.kv, len(prompts), len(prompts[0])
    seqs = [(step_id + i, i % ex.num_replicas) for i in range(b)]  # round-robin over replicas
    kv = [ReplicaKV(spec.num_blocks, spec.sliding_blocks(cfg.sliding_window), spec.block_size,
                    cfg.sliding_window, caching=False) for _ in range(ex.num_replicas)]
    for s, r in seqs:
        kv[r].admit(s, [], 0, input_len + warmup + steps + 2)
    start = time.perf_counter()
    results = ex.execute(chunk_steps(seqs, {s: p for (s, _), p in zip(seqs, prompts)}, 0, step_id, kv))
    prefill = time.perf_counter() - start
    last = {s.seq_id: [s.token] for r in results.values() for s in r.sampled}
    times, waits, shard_s, computes = [], [], [], []
    for i in range(warmup + steps):
        if i == warmup:
            del times[:], waits[:], shard_s[:], computes[:]
            before = ex.stats().router
        step_id += 1
        start = time.perf_counter()
        results = ex.execute(chunk_steps(seqs, last, input_len + i, step_id, kv))
        times.append(time.perf_counter() - start)
        least = min(results.values(), key=lambda r: r.moe_wait_s)  # the least-skewed replica
        waits.append(least.moe_wait_s)
        shard_s.append(least.shard_s)
        computes.append(least.compute_s)
        last = {s.seq_id: [s.token] for r in results.values() for s in r.sampled}
    after = ex.stats().router
    step_id += 1
    results, counts = ex.counted(chunk_steps(seqs, last, input_len + warmup + steps, step_id, kv))
    ex.execute(release_steps(seqs, step_id + 1))
    row = _row(label, b, prefill, times, waits, shard_s, computes, before, after, cfg.num_hidden_layers)
    row.syncs_by_process = {name: c.syncs for name, c in counts.items()}
    row.host_syncs_per_step = max(row.syncs_by_process.values())
    row.ops_per_layer = sum(c.ops for c in counts.values()) / cfg.num_hidden_layers
    return row


def _row(label: str, batch: int, prefill: float, times: list[float], waits: list[float], shard_s: list[float],
         computes: list[float], before: RouterStats, after: RouterStats, num_layers: int) -> DecodeRow:
    p50 = statistics.median(times)
    row = DecodeRow(label, batch, prefill * 1e3, p50 * 1e3, sorted(times)[int(0.9 * (len(times) - 1))] * 1e3, batch / p50)
    if sum(waits) > 0:  # the cluster: the MoE was waited for, not computed in process
        # median wait per step (scheduling hiccups on a busy machine skew a mean), against the
        # mean compute of the router and of the slowest shard
        routing = (after.route_s - before.route_s) / (len(times) * num_layers)
        shard = statistics.fmean(shard_s) / num_layers
        wait = statistics.median(waits) / num_layers
        row.moe_wait_us_per_layer = wait * 1e6
        row.replica_us_per_layer = statistics.median(computes) / num_layers * 1e6
        row.data_plane_us_per_layer = (wait - routing - shard) * 1e6
        row.router_us_per_layer, row.shard_us_per_layer = routing * 1e6, shard * 1e6
        loads = [[n - m for n, m in zip(a, b)] for a, b in zip(after.shard_tokens, before.shard_tokens)]
        row.shard_imbalance = shard_imbalance(loads)[1]
    return row
