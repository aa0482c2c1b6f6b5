"""The expert shard: experts [a, b) of every layer, read as a slice of the checkpoint; computes the
gate-weighted clamped-SwiGLU outputs of the assignments the router sends it."""

from __future__ import annotations

import time

from cluster.config import ShardSpec, actor_device
from cluster.messages import ShardRequest, ShardResult
from cluster.names import ROUTER, SHARD_ROLE
from cluster.telemetry import ShardStats
from cluster.transport import Endpoint
from model_shards.moe import run_experts
from model_shards.weights import load_experts, move_to, prepare


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
            self.bytes_read = ckpt.bytes_read
        move_to(self.weights, self.device)
        prepare(self.weights)

    def reset(self) -> None:
        """Stateless between messages."""

    def compute(self, req: ShardRequest) -> ShardResult:
        start = time.perf_counter()
        d = self.device
        weighted = run_experts(req.x.to(d, self.dtype), req.token_index.to(d), req.expert_ids.to(d), req.gates.to(d),
                               self.weights[req.layer], self.config)
        return ShardResult(req.step_id, req.layer, weighted, time.perf_counter() - start)

    def serve(self, ep: Endpoint) -> None:
        while True:
            ep.send(ROUTER, self.compute(ep.recv(ROUTER)))

    def stats(self) -> ShardStats:
        return ShardStats(self.bytes_read)
