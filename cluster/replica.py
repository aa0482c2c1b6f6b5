"""The attention replica: embedding, attention with its KV cache, norms and sampling for the
sequences the engine gives it; the MoE block of every layer goes to the router and back."""

from __future__ import annotations

import time

import torch

from cluster.config import ReplicaSpec, actor_device
from cluster.messages import MoeRequest, MoeResult, ReplicaStep, StepResult
from cluster.names import ENGINE, REPLICA_ROLE, ROUTER
from cluster.step import run_replica_step
from cluster.telemetry import ReplicaStats
from cluster.transport import Endpoint
from model_shards.kv_cache import KVCache
from model_shards.logits import Histories
from model_shards.model import GptOssModel
from model_shards.weights import ModelWeights, load_attention, load_globals, move_to, prepare


class AttentionReplica:
    role = REPLICA_ROLE
    experts = None

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.device = actor_device(spec.use_gpu)
        dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            weights = ModelWeights(ckpt.config, load_globals(ckpt, dtype), load_attention(ckpt, dtype), [], [])
        move_to(weights, self.device)
        prepare(weights)
        self.model = GptOssModel(weights)
        self.reset()

    def reset(self) -> None:
        kv, cfg = self.spec.kv, self.model.config
        self.histories = Histories()  # penalty histories of the sequences in the cache
        self.kv = KVCache(cfg, kv.num_blocks, kv.block_size, kv.sliding_blocks(cfg.sliding_window), self.model.dtype,
                          self.device)

    def serve(self, ep: Endpoint) -> None:
        while True:
            step: ReplicaStep = ep.recv(ENGINE)
            ep.send(ENGINE, self.run(step, ep))

    def run(self, step: ReplicaStep, ep: Endpoint) -> StepResult:
        start = time.perf_counter()
        waited = 0.0

        def moe(layer: int, t: torch.Tensor) -> torch.Tensor:
            nonlocal waited
            sent = time.perf_counter()
            ep.send(ROUTER, MoeRequest(step.step_id, layer, t))
            reply: MoeResult = ep.recv(ROUTER)
            waited += time.perf_counter() - sent
            if (reply.step_id, reply.layer) != (step.step_id, layer):
                raise RuntimeError(f"router answered step {reply.step_id} layer {reply.layer}, "
                                   f"expected {step.step_id} layer {layer}")
            return reply.y.to(self.device)

        sampled = run_replica_step(self.model, self.kv, step, moe, self.histories)
        return StepResult(step.step_id, self.index, sampled, time.perf_counter() - start - waited, waited,
                          self.kv.usage())

    def stats(self) -> ReplicaStats:
        return ReplicaStats(self.kv.usage())
