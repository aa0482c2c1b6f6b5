"""Executors run one engine step on whatever holds the model; the engine does not care which.

- LocalExecutor: the whole model in this process (one attention "replica"); `--engine local`.
- ClusterExecutor (cluster_executor.py): attention replicas, router and expert shards as Ray actors.

A step is a `ReplicaStep` per busy replica; the answer is a `StepResult` per replica. The failure
contract is the same for both: any failure of a step (an actor died or hung, the KV cache refused a
reservation, the device ran out of memory, a bug) raises `ExecutorFailure`; the engine then calls
`recover()`, after which every replica's KV cache is empty, and prefills in-flight sequences again.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from cluster.config import KVSpec, ModelSource
from cluster.dataplane.messages import ActorInfo, ReplicaStep, StepResult
from cluster.engine.replica_core import ReplicaCore
from cluster.engine.step import run_replica_step
from model_shards.decode_graph import StaticDecoder
from cluster.telemetry import ExecutorStats, Histogram, ReplicaStats, RouterStats, ShardStats
from model_shards.capabilities import cpu_features
from model_shards.config import GptOssConfig
from model_shards.kv_cache import KVCache
from model_shards.moe import moe_block
from model_shards.syncs import DispatchCount, count_dispatch

log = logging.getLogger(__name__)


class ExecutorFailure(RuntimeError):
    """A step could not complete (an actor died, hung, or raised; the KV cache or memory ran out)."""


class ResizeRefused(ValueError):
    """A resize that cannot start: counts out of range, another resize under way, an executor that
    cannot change its actors (the local one)."""


@dataclass(frozen=True)
class ResizeOutcome:
    """How a resize (cluster/actors/resize.py) ended: the engine books it (scheduler, metrics, logs) and
    answers whoever asked."""

    reason: str  # manual | autoscale: <signal> | ...; the metrics' label and the log line
    replicas: tuple[int, int]  # attention replicas before, after (after == before when it failed)
    shards: tuple[int, int]  # expert shards before, after
    seconds: float  # from the request to the new plane serving (or to the failure)
    error: str | None = None  # why it failed; the engine keeps serving on the old plane

    @property
    def ok(self) -> bool:
        return self.error is None


def error_line(report: str) -> str:
    """The exception at the end of a remote traceback (Ray's report of an actor or a Serve replica
    whose constructor raised), as one line: "Type: message"."""
    lines = [line.strip() for line in report.splitlines() if line.strip()]
    errors = [line for line in lines if ": " in line and not line.startswith(("File ", "The actor", "Traceback"))]
    line = (errors or lines or ["unknown error"])[-1]
    head, sep, rest = line.partition(": ")
    if sep and "." in head and " " not in head:  # a qualified type name: its last part says enough
        line = f"{head.rsplit('.', 1)[1]}: {rest}"
    return line[:500]


class Executor(ABC):
    config: GptOssConfig
    kv: KVSpec  # capacity of each attention replica
    num_replicas: int
    balancing: bool = False  # rebalances experts while serving (--eplb-interval): the cluster only

    @abstractmethod
    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        """Run one step; `steps` maps replica index -> its part. Raises ExecutorFailure."""

    @abstractmethod
    def recover(self) -> None:
        """Bring every actor back (restarting what died or hung) with empty KV caches."""

    @abstractmethod
    def topology(self) -> list[ActorInfo]: ...

    @abstractmethod
    def stats(self) -> ExecutorStats: ...

    def rebalance(self) -> bool:
        """Place experts by the recent routed load now (staged when this returns, switched at the next
        step). -> whether the placement changes. The local engine holds every expert: never."""
        return False

    # -- live resize (the cluster only; resize.py) -------------------------------------------------
    @property
    def num_shards(self) -> int:
        return 1

    def start_resize(self, replicas: int, shards: int, reason: str, timeout_s: float | None = None) -> None:
        """Begin placing and loading actors for `replicas` attention replicas and `shards` expert
        shards while steps go on; `poll_resize` finishes it at a step boundary. Raises ResizeRefused."""
        raise ResizeRefused("this engine cannot resize: the local engine holds the whole model in one process")

    def poll_resize(self) -> ResizeOutcome | None:
        """At a step boundary, from the engine's thread: switch to the new plane once it is ready (or
        give up at the timeout). -> the outcome once the resize ended, else None."""
        return None

    def enter_thread(self) -> None:
        """Called by the thread that will run execute() (the engine's loop), before its first step."""

    def counted(self, steps: dict[int, ReplicaStep]) -> tuple[dict[int, StepResult], dict[str, DispatchCount]]:
        """execute(steps), counting the host syncs and ops of each process that computes (syncs.py):
        -> the results and, per process ("local", or the actors' data-plane names), what it dispatched.
        For benchmarks and tests: counting slows every op down. By default the step computes here."""
        with count_dispatch() as count:
            results = self.execute(steps)
        return results, {"local": count}

    def shutdown(self) -> None:
        """Release actors and resources."""


class LocalExecutor(Executor):
    """The whole model in this process: one replica core (replica_core.py) that also holds every
    expert, so the MoE block of each layer is computed in process."""

    def __init__(self, source: ModelSource, kv: KVSpec, threads: int | None = None, enforce_eager: bool = False,
                 static_decode: bool | str | None = None) -> None:
        """Decode-only steps run from static buffers and, on CUDA, as CUDA graphs (decode_graph.py),
        unless `enforce_eager`. `static_decode` forces the static buffers on or off (default: on
        where graphs are captured, that is CUDA; elsewhere they gain nothing); "exact": buffers of
        each step's own shapes (tests)."""
        # Inside a Ray actor (a Serve replica) OMP_NUM_THREADS is the actor's CPU count, 1 by default:
        # the local engine computes with the threads it is given, or every core.
        self.threads = threads or os.cpu_count() or 1
        torch.set_num_threads(self.threads)
        self.dtype = source.dtype
        self.core = ReplicaCore(source, kv, source.device, with_experts=True)
        self.model = self.core.model
        self.config = self.model.config
        self.kv = kv
        self.num_replicas = 1
        # routed tokens per layer and expert, counted on the model's device (read by stats(), between steps)
        self.expert_tokens = torch.zeros(self.config.num_hidden_layers, self.config.num_experts, dtype=torch.long,
                                         device=self.model.device)
        self.moe_time = Histogram()  # the single "shard": every expert, in this process
        self.recoveries = 0
        graphs = not enforce_eager and self.model.device.type == "cuda"
        use_static = graphs if static_decode is None else static_decode
        self.decoder = StaticDecoder(self.model, self._moe, graphs, static_decode == "exact") if use_static else None

    @property
    def cache(self) -> KVCache:
        return self.core.cache

    def enter_thread(self) -> None:
        torch.set_num_threads(self.threads)  # OpenMP's thread count is a per-thread setting

    def _moe(self, layer: int, t: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """`real` [T]: which rows are tokens (a static decode batch's padding is not counted). Inside
        a CUDA graph this runs at capture only: the MoE time is then observed there, not per step."""
        start = time.perf_counter()
        w = self.model.weights
        y = moe_block(t, w.routers[layer], w.experts[layer], self.config, self.expert_tokens[layer], real)
        self.moe_time.observe(time.perf_counter() - start)
        return y

    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        out = {}
        for replica, step in steps.items():
            start = time.perf_counter()
            try:
                sampled = run_replica_step(self.model, self.core.cache, step, self._moe, self.core.histories,
                                           self.decoder)
            except Exception as exc:  # KVCacheFull, out of memory, a bug: the step is lost, as with a dead actor
                log.warning("local step %d failed", step.step_id, exc_info=exc)
                raise ExecutorFailure(f"the step failed: {type(exc).__name__}: {exc}") from exc
            out[replica] = StepResult(step.step_id, replica, sampled, time.perf_counter() - start, 0.0,
                                      self.core.usage())
        return out

    def recover(self) -> None:
        self.core.reset()
        if self.decoder is not None:
            self.decoder.reset()  # its buffers and graphs were bound to the old cache
        self.recoveries += 1

    def topology(self) -> list[ActorInfo]:
        return [ActorInfo("local", 0, os.getpid(), "local", str(self.model.device), [0, self.config.num_experts],
                          self.threads, self.dtype, cpu_features().summary())]

    def stats(self) -> ExecutorStats:
        counts = self.expert_tokens.cpu()
        per_layer = tuple((int(n),) for n in counts.sum(1).tolist())  # one "shard": every expert
        router = RouterStats(tuple(counts.sum(0).tolist()), per_layer, 0.0)
        return ExecutorStats((ReplicaStats(self.core.usage()),), router, (ShardStats(None, self.moe_time.snapshot()),),
                             self.recoveries)
