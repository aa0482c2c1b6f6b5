"""The expert shard: experts [a, b) of every layer, read as a slice of the checkpoint; computes the
gate-weighted clamped-SwiGLU outputs of the assignments the router sends it and answers the replicas
they belong to directly."""

from __future__ import annotations

import time

import torch

from cluster.config import ShardSpec, actor_device
from cluster.messages import ShardRequest, ShardResult
from cluster.names import ROUTER, SHARD_ROLE, replica_name
from cluster.telemetry import Histogram, ShardStats
from cluster.transport import Endpoint
from model_shards.moe import run_experts
from model_shards.weights import budget_decoded, load_experts, move_to, prepare


class ExpertShard:
    role = SHARD_ROLE

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.experts = spec.experts
        self.device = actor_device(spec.use_gpu)
        self.dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            self.config = ckpt.config
            self.weights = load_experts(ckpt, self.dtype, experts=spec.experts, keep_mxfp4=spec.keep_mxfp4)
            budget_decoded(self.weights, spec.source.expert_cache_bytes)
            self.bytes_read = ckpt.bytes_read
        move_to(self.weights, self.device)
        prepare(self.weights)
        self.step = Histogram()  # compute time per request (one layer of one micro-batch)

    def reset(self) -> None:
        """Stateless between messages."""

    def compute(self, req: ShardRequest) -> list[tuple[int, ShardResult]]:
        """-> (replica, its part of the answer), in the request's replica order."""
        start = time.perf_counter()
        d = self.device
        weighted = run_experts(req.x.to(d, self.dtype), req.token_index.to(d), req.expert_ids.to(d), req.gates.to(d),
                               self.weights[req.layer], self.config)
        elapsed = time.perf_counter() - start
        self.step.observe(elapsed)
        parts = torch.split(weighted, req.counts.tolist())  # assignments are token-major: one run per replica
        return [(r, ShardResult(req.step_id, req.layer, req.micro, part, elapsed))
                for r, part in zip(req.replicas.tolist(), parts)]

    def serve(self, ep: Endpoint) -> None:
        while True:
            for r, part in self.compute(ep.recv(ROUTER)):
                ep.send(replica_name(r), part)

    def stats(self) -> ShardStats:
        return ShardStats(self.bytes_read, self.step.snapshot())
