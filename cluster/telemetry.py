"""Typed telemetry: what each role reports (`stats()`), and the timing histograms they keep.

Actors keep counts per fixed bucket (never raw samples), so reading them is cheap and a scrape
shows everything since start, as Prometheus histograms expect. Every stats record is a dataclass,
because it crosses an actor boundary and because its readers (deploy/server/metrics.py, the benchmark)
should name fields, not string keys.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

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
    shard_tokens: tuple[tuple[int, ...], ...]  # [L][M] routed assignments of each layer per expert shard
    # the router's own compute (routing, dispatch) summed over layers since start, not its sends and
    # receives; what a replica waits for the MoE beyond this and the slowest shard's compute
    # (StepResult.shard_s) is the data plane (the benchmark reports it)
    route_s: float
    placement: int = 0  # the version of the expert placement it routes by
    recent_shard_tokens: tuple[tuple[int, ...], ...] = ()  # [L][M] as shard_tokens, over the last --eplb-window steps


@dataclass(frozen=True)
class ExpertLoad:
    """The router's recent per-expert counts, which a rebalance places experts by."""

    steps: int  # steps counted (up to --eplb-window)
    counts: np.ndarray  # [L, E] routed assignments per layer and expert over those steps


@dataclass(frozen=True)
class ShardStats:
    bytes_read: int | None  # checkpoint bytes this shard read for its slice (None: the local executor's experts)
    step: HistogramSnapshot  # compute time of one layer's rows (one micro-batch's)
    placement: int = 0  # the version of the expert placement it holds (eplb.py)
    slices_read: int = 0  # (layer, expert) slices read from the checkpoint since start
    assignments: int = 0  # routed assignments computed since start
    slots: tuple[tuple[int, ...], ...] = ()  # [L][S] the expert in each of its slots


@dataclass(frozen=True)
class ExecutorStats:
    replicas: tuple[ReplicaStats, ...]
    router: RouterStats
    shards: tuple[ShardStats, ...]  # the local executor: one, every expert in its process
    recoveries: int = 0
    rebalances: int = 0  # expert placement switches since start (rebalance.py)


@dataclass(frozen=True)
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float  # mean over replicas of the full-attention KV blocks in use (a shared block counts once)
    steps: int
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hits: int = 0  # of those, tokens whose KV was reused
    kv_cached_share: float = 0.0  # mean over replicas of the KV blocks that hold reusable prefix content


def shard_imbalance(loads: Sequence[Sequence[int]]) -> tuple[list[float], float]:
    """loads [L][M] routed assignments per layer and shard -> (per layer: the busiest shard's load over
    the mean shard load; overall: the same over the whole forward pass, sum over layers of the busiest
    over sum of the means, which is what the slowest shard of each layer costs against an even split).
    1.0 where nothing was routed."""
    per_layer, busiest, mean = [], 0.0, 0.0
    for layer in loads:
        top, avg = float(max(layer, default=0)), sum(layer) / max(1, len(layer))
        per_layer.append(top / avg if avg else 1.0)
        busiest, mean = busiest + top, mean + avg
    return per_layer, busiest / mean if mean else 1.0
