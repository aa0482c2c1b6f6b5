"""Executors run one engine step on whatever holds the model; the engine does not care which.

- LocalExecutor: the whole model in this process (one attention "replica"); `--engine local`.
- ClusterExecutor (cluster_executor.py): attention replicas, router and expert shards as Ray actors.

A step is a `ReplicaStep` per busy replica; the answer is a `StepResult` per replica. An executor
that loses an actor or times out raises `ExecutorFailure`; the engine then calls `recover()`, after
which every replica's KV cache is empty and in-flight sequences are prefilled again.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from typing import Any

import torch

from cluster.config import KVSpec, ModelSource
from cluster.messages import ActorInfo, ReplicaStep, StepResult
from cluster.stats import Histogram
from cluster.step import run_replica_step
from model_shards.config import GptOssConfig
from model_shards.kv_cache import KVCache
from model_shards.loader import load_local_model
from model_shards.moe import moe_block


class ExecutorFailure(RuntimeError):
    """A step could not complete (an actor died, hung, or raised)."""


class Executor(ABC):
    config: GptOssConfig
    kv: KVSpec  # capacity of each attention replica
    num_replicas: int

    @abstractmethod
    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        """Run one step; `steps` maps replica index -> its part. Raises ExecutorFailure."""

    @abstractmethod
    def recover(self) -> None:
        """Bring every actor back (restarting what died or hung) with empty KV caches."""

    @abstractmethod
    def topology(self) -> list[ActorInfo]: ...

    def stats(self) -> dict[str, Any]:
        return {}

    def shutdown(self) -> None:
        """Release actors and resources."""


class LocalExecutor(Executor):
    def __init__(self, source: ModelSource, kv: KVSpec, keep_mxfp4: bool = False, device: str = "cpu") -> None:
        self.model = load_local_model(source.model, source.torch_dtype, keep_mxfp4, device, source.layout)
        self.config = self.model.config
        self.kv = kv
        self.num_replicas = 1
        self.expert_tokens = torch.zeros(self.config.num_experts, dtype=torch.long)  # summed over layers
        self.moe_time = Histogram()  # the single "shard": every expert, in this process
        self.recover()

    def _moe(self, layer: int, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        w = self.model.weights
        y = moe_block(t, w.routers[layer], w.experts[layer], self.config, self.expert_tokens)
        self.moe_time.observe(time.perf_counter() - start)
        return y

    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        out = {}
        for replica, step in steps.items():
            start = time.perf_counter()
            sampled = run_replica_step(self.model, self.cache, step, self._moe)
            out[replica] = StepResult(step.step_id, replica, sampled, time.perf_counter() - start, 0.0,
                                      self.cache.usage())
        return out

    def recover(self) -> None:
        self.cache = KVCache(self.config, self.kv.num_blocks, self.kv.max_seqs, self.kv.block_size,
                             self.model.dtype, self.model.device)

    def topology(self) -> list[ActorInfo]:
        return [ActorInfo("local", 0, os.getpid(), "local", str(self.model.device), [0, self.config.num_experts])]

    def stats(self) -> dict[str, Any]:
        return {"replica0": {"kv_usage": self.cache.usage()},
                "router": {"expert_tokens": self.expert_tokens.tolist(), "shard_step": [self.moe_time.snapshot()]}}
