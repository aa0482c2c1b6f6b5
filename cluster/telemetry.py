"""Typed telemetry: what each role reports (`stats()`), and the timing histograms they keep.

Actors keep counts per fixed bucket (never raw samples), so reading them is cheap and a scrape
shows everything since start, as Prometheus histograms expect. Every stats record is a dataclass,
because it crosses an actor boundary and because its readers (deploy/metrics.py, the benchmark)
should name fields, not string keys.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# seconds: from sub-millisecond CPU steps of tiny models to multi-second prefills
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True)
class HistogramSnapshot:
    buckets: tuple[float, ...]  # upper bounds; counts has one more entry (over the top)
    counts: tuple[int, ...]
    sum: float


@dataclass
class Histogram:
    buckets: tuple[float, ...] = STEP_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))  # last: over the top
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def snapshot(self) -> HistogramSnapshot:
        return HistogramSnapshot(tuple(self.buckets), tuple(self.counts), self.total)


@dataclass(frozen=True)
class ReplicaStats:
    kv_usage: float  # fraction of its full-attention KV blocks in use


@dataclass(frozen=True)
class RouterStats:
    expert_tokens: tuple[int, ...]  # [E] tokens routed to each expert, summed over layers
    shard_step: tuple[HistogramSnapshot, ...]  # per shard: compute time of one layer's rows
    # Summed over layers since start: the router's own compute (routing, dispatch, combine; not its
    # sends and receives) and the slowest shard's compute. What a replica waits for the MoE beyond
    # these two is the data plane (the benchmark reports it).
    route_s: float
    shard_max_s: float


@dataclass(frozen=True)
class ShardStats:
    bytes_read: int  # checkpoint bytes this shard read to load its slice


@dataclass(frozen=True)
class ExecutorStats:
    replicas: tuple[ReplicaStats, ...]
    router: RouterStats
    shards: tuple[ShardStats, ...] = ()  # empty for the local executor (one process holds every expert)
    recoveries: int = 0


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float  # mean over replicas of the full-attention KV blocks in use (a shared block counts once)
    steps: int
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int = 0  # of those, tokens whose KV was reused
    kv_cached_share: float = 0.0  # mean over replicas of the KV blocks that hold reusable prefix content
