"""Prometheus metrics of the server: one registry, two ways out.

- `/metrics` on the serving port renders the registry (names `gptoss_*`, label `model_name`).
- Inside a Ray cluster, `RayExport` copies every sample into Ray's metrics every few seconds, so the
  node's Ray metrics port shows them too (Ray prefixes them: `ray_gptoss_*`). Every sample becomes a
  Ray gauge; histogram buckets keep their `le` label, so PromQL quantiles work on either.

Per-request values are observed when a request ends, from the engine's own timestamps. Engine-wide
values (running, waiting, KV use, tokens per expert, per-shard step times) are read from the engine
and its executor when scraped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from ray.util.metrics import Gauge

from cluster.engine.engine import Engine
from cluster.engine.events import RequestTimes
from cluster.telemetry import ExecutorStats, HistogramSnapshot, shard_imbalance
from cluster.telemetry import Histogram as BucketCounts

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
RESIZE_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
RESIZE_KINDS = ("manual", "autoscale")
STATS_MAX_AGE_S = 1.0  # a scrape reuses executor stats this fresh (they cost one call per actor)


class EngineCollector(Collector):
    """Engine-wide gauges and counters, read at scrape time."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self._stats: ExecutorStats | None = None
        self._stats_at = 0.0

    def _executor_stats(self) -> ExecutorStats | None:
        if time.monotonic() - self._stats_at > STATS_MAX_AGE_S:
            try:
                self._stats = self.engine.executor.stats()
            except Exception as exc:  # an actor being restarted: keep the last numbers
                log.warning("executor stats unavailable: %s", exc)
            self._stats_at = time.monotonic()
        return self._stats

    def collect(self) -> Iterator[Metric]:
        name = [self.model_name]
        load = self.engine.load()
        for metric, value, text in (
                ("gptoss_num_requests_running", load.running, "requests being generated"),
                ("gptoss_num_requests_waiting", load.waiting, "requests queued for admission"),
                ("gptoss_kv_cache_usage_ratio", load.kv_usage,
                 "fraction of KV blocks in use, mean over replicas (a block shared by several requests counts once)"),
                ("gptoss_kv_cache_cached_ratio", load.kv_cached_share,
                 "fraction of KV blocks holding reusable prefix content, mean over replicas")):
            family = GaugeMetricFamily(metric, text, labels=["model_name"])
            family.add_metric(name, float(value))
            yield family
        for metric, count, text in (
                ("gptoss_prefix_cache_queries", load.prefix_queries, "prompt tokens looked up in the prefix cache"),
                ("gptoss_prefix_cache_hits", load.prefix_hits, "prompt tokens whose KV came from the prefix cache")):
            counter = CounterMetricFamily(metric, text, labels=["model_name"])
            counter.add_metric(name, float(count))
            yield counter
        stats = self._executor_stats()
        experts = CounterMetricFamily("gptoss_expert_tokens", "tokens routed to each expert, summed over layers",
                                      labels=["model_name", "expert"])
        steps = HistogramMetricFamily("gptoss_expert_shard_step_seconds",
                                      "compute time of one expert shard for one layer of one step",
                                      labels=["model_name", "shard"])
        if stats is not None:
            for expert, count in enumerate(stats.router.expert_tokens):
                experts.add_metric([self.model_name, str(expert)], float(count))
            for shard, shard_stats in enumerate(stats.shards):
                hist = shard_stats.step
                steps.add_metric([self.model_name, str(shard)], _cumulative(hist), hist.sum)
        shard_tokens = CounterMetricFamily("gptoss_expert_shard_tokens",
                                           "routed assignments each expert shard computed, summed over layers",
                                           labels=["model_name", "shard"])
        imbalance = GaugeMetricFamily("gptoss_expert_shard_imbalance",
                                      "busiest expert shard's routed load over the mean, since start, per layer "
                                      "and over the whole pass (layer=\"all\"); 1 is even",
                                      labels=["model_name", "layer"])
        if stats is not None and stats.router.shard_tokens:
            loads = stats.router.shard_tokens
            for shard, count in enumerate(map(sum, zip(*loads))):
                shard_tokens.add_metric([self.model_name, str(shard)], float(count))
            per_layer, overall = shard_imbalance(loads)
            for layer, value in enumerate(per_layer):
                imbalance.add_metric([self.model_name, str(layer)], value)
            imbalance.add_metric([self.model_name, "all"], overall)
        recent = GaugeMetricFamily("gptoss_expert_recent_shard_imbalance",
                                   "busiest expert shard's routed load over the mean, whole pass, over the last "
                                   "--eplb-window steps (what a rebalance looks at and should bring down)",
                                   labels=["model_name"])
        rebalances = CounterMetricFamily("gptoss_expert_rebalances", "expert placement switches since start",
                                         labels=["model_name"])
        if stats is not None:
            if stats.router.recent_shard_tokens:
                recent.add_metric(name, shard_imbalance(stats.router.recent_shard_tokens)[1])
            rebalances.add_metric(name, float(stats.rebalances))
        yield from self._scaling()
        yield experts
        yield steps
        yield shard_tokens
        yield imbalance
        yield recent
        yield rebalances


    def _scaling(self) -> Iterator[Metric]:
        """The plane's actor counts, and every resize so far (the engine keeps each outcome)."""
        replicas, shards = self.engine.counts()
        for metric, value, text in (("gptoss_attention_replicas", replicas, "attention replicas of the serving plane"),
                                    ("gptoss_expert_shards", shards, "expert shards of the serving plane")):
            family = GaugeMetricFamily(metric, text, labels=["model_name"])
            family.add_metric([self.model_name], float(value))
            yield family
        # the reason label is the kind (manual, autoscale): few series, each present from the start so
        # that dashboards find them; the signal behind an autoscale resize is in the engine's log line
        resizes = CounterMetricFamily("gptoss_resizes", "resizes of the plane that ended, by kind (manual, autoscale) "
                                                        "and outcome (ok, or failed: the old plane served on)",
                                      labels=["model_name", "reason", "outcome"])
        durations = HistogramMetricFamily("gptoss_resize_duration_seconds",
                                          "from a resize's request to the new plane serving (or its failure)",
                                          labels=["model_name", "reason"])
        counts = {(kind, result): 0 for kind in RESIZE_KINDS for result in ("ok", "failed")}
        hists = {kind: _resize_histogram() for kind in RESIZE_KINDS}
        for outcome in list(self.engine.resizes):
            kind = outcome.reason.split(":")[0]
            key = (kind, "ok" if outcome.ok else "failed")
            counts[key] = counts.get(key, 0) + 1
            hists.setdefault(kind, _resize_histogram()).observe(outcome.seconds)
        for (kind, result), n in sorted(counts.items()):
            resizes.add_metric([self.model_name, kind, result], float(n))
        for kind, hist in sorted(hists.items()):
            durations.add_metric([self.model_name, kind], _cumulative(hist.snapshot()), hist.total)
        yield resizes
        yield durations


def _resize_histogram() -> BucketCounts:
    return BucketCounts(RESIZE_BUCKETS, [0] * (len(RESIZE_BUCKETS) + 1))


def _cumulative(hist: HistogramSnapshot) -> list[tuple[str, float]]:
    """Per-bucket counts -> Prometheus' cumulative (le, count) pairs."""
    cumulative, out = 0, []
    for edge, count in zip([*hist.buckets, float("inf")], hist.counts):
        cumulative += count
        out.append(("+Inf" if edge == float("inf") else repr(float(edge)), float(cumulative)))
    return out


class ServerMetrics:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, text: str) -> Histogram:
            return Histogram(name, text, labels, registry=self.registry, buckets=LATENCY_BUCKETS)

        self.ttft = histogram("gptoss_time_to_first_token_seconds", "arrival to first generated token")
        self.itl = histogram("gptoss_inter_token_latency_seconds", "time between consecutive generated tokens")
        self.e2e = histogram("gptoss_e2e_request_latency_seconds", "arrival to the request's end")
        self.queue = histogram("gptoss_request_queue_time_seconds", "arrival to the first step that ran it")
        self.prompt_tokens = Counter("gptoss_prompt_tokens", "prompt tokens of finished requests", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("gptoss_generation_tokens", "generated tokens", labels, registry=self.registry)
        self.requests = Counter("gptoss_requests", "finished requests by reason (stop, length, abort, error)",
                                [*labels, "finished_reason"], registry=self.registry)
        self.registry.register(EngineCollector(engine, model_name))

    def request_finished(self, prompt_tokens: int, generated: int, reason: str, times: RequestTimes | None) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generated)
        self.requests.labels(m, reason).inc()
        if times is None or times.finished is None:
            return
        self.e2e.labels(m).observe(times.finished - times.arrival)
        if times.scheduled is not None:
            self.queue.labels(m).observe(times.scheduled - times.arrival)
        if times.first_token is not None:
            self.ttft.labels(m).observe(times.first_token - times.arrival)
        for earlier, later in zip(times.token_times, times.token_times[1:]):
            self.itl.labels(m).observe(later - earlier)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RayExport:
    """Copies the registry into Ray's metrics every `period_s` (only where Ray is running)."""

    def __init__(self, registry: CollectorRegistry, period_s: float = 5.0) -> None:
        self.registry = registry
        self.period_s = period_s
        self._gauges: dict[str, Gauge] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gptoss-ray-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.push()
            except Exception as exc:  # metrics must never take the server down
                log.warning("could not export metrics to Ray: %s", exc)

    def push(self) -> None:
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = self._gauges[sample.name] = Gauge(sample.name, family.documentation, tag_keys=keys)
                gauge.set(sample.value, tags=dict(sample.labels))

    def stop(self) -> None:
        self._stop.set()
