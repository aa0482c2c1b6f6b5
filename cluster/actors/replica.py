"""The attention replica: embedding, attention with its KV cache, norms and sampling for the
sequences the engine gives it; the MoE block of every layer goes to the router, and the shards that
compute it answer here, where each token's K outputs are combined."""

from __future__ import annotations

import time

import numpy as np
import torch

from cluster.config import ReplicaSpec, actor_device
from cluster.dataplane.messages import MoeRequest, MoeRoute, ReplicaStep, ShardResult, StepResult
from cluster.dataplane.names import ENGINE, REPLICA_ROLE, ROUTER, shard_name
from cluster.engine.step import run_micro_batched
from cluster.dataplane.transport import Endpoint
from cluster.engine.replica_core import ReplicaCore
from cluster.telemetry import ReplicaStats
from model_shards.moe import combine
from model_shards.syncs import Meter, host_list, host_numpy


class AttentionReplica:
    role = REPLICA_ROLE
    experts = None

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.device = actor_device(spec.use_gpu)
        self.core = ReplicaCore(spec.source, spec.kv, self.device, with_experts=False)  # the MoE runs on the shards
        self.model = self.core.model
        self.meter = Meter()  # host syncs and ops per step, counted on request (bench, tests)

    def reset(self) -> None:
        self.core.reset()

    def serve(self, ep: Endpoint) -> None:
        while True:
            step: ReplicaStep = ep.recv(ENGINE)
            with self.meter.measure():
                result = self.run(step, ep)
            ep.send(ENGINE, result)

    def run(self, step: ReplicaStep, ep: Endpoint) -> StepResult:
        start = time.perf_counter()
        waited = shard_s = 0.0
        k = self.model.config.experts_per_token

        def send(layer: int, micro: int, t: torch.Tensor) -> None:
            nonlocal waited
            began = time.perf_counter()
            ep.send(ROUTER, MoeRequest(step.step_id, layer, micro, t))
            waited += time.perf_counter() - began

        def recv(layer: int, micro: int) -> torch.Tensor:
            """The shards' answers for this group's rows, combined in (token, k) order."""
            nonlocal waited, shard_s
            began = time.perf_counter()
            route: MoeRoute = ep.recv(ROUTER)
            _expect(route, step.step_id, layer, micro, "the router")
            parts: list[ShardResult] = []
            for shard in host_list(route.shards):
                parts.append(ep.recv(shard_name(shard)))
                _expect(parts[-1], step.step_id, layer, micro, f"shard {shard}")
            waited += time.perf_counter() - began
            shard_s += max((p.compute_s for p in parts), default=0.0)
            # answers arrive on the host (rings, TCP) or on this device (NCCL)
            return merge_answers(route, parts, k, self.model.dtype, self.device)

        sampled = run_micro_batched(self.model, self.core.cache, step, send, recv, self.core.histories)
        return StepResult(step.step_id, self.index, sampled, time.perf_counter() - start - waited, waited,
                          self.core.usage(), shard_s)

    def stats(self) -> ReplicaStats:
        return ReplicaStats(self.core.usage())


def merge_answers(route: MoeRoute, parts: list[ShardResult], k: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """The answers of route.shards (in that order) to one replica's T tokens -> its MoE output [T, H]
    in `dtype`: per-assignment outputs go to their t*K + k slots and are summed over k in order; the
    answers that came summed per token (moe.fused_rows) are added after, in shard order (moe.combine).
    Under the device's dispatch (route.dense) every shard answers every slot, zero where not its own:
    the answers' sum is each slot's one output exactly."""
    if route.dense:
        weighted = parts[0].weighted.to(device)
        for part in parts[1:]:
            weighted = weighted + part.weighted.to(device)
        return combine(weighted, k, dtype)
    host = route.slots  # [T*K] grouped by shard, token-major within each (host memory: the message's)
    slots = host.to(device)
    weighted = torch.empty(slots.shape[0], parts[0].weighted.shape[1], dtype=torch.float32, device=device)
    summed: torch.Tensor | None = None  # [T, H]
    offset = 0
    for part, count in zip(parts, host_list(route.counts)):
        mine = slots[offset:offset + count]
        if not part.summed:
            weighted[mine] = part.weighted.to(device)
            offset += count
            continue
        weighted[mine] = 0
        if summed is None:
            summed = torch.zeros(slots.shape[0] // k, weighted.shape[1], dtype=torch.float32, device=device)
        tokens = np.unique(host_numpy(host[offset:offset + count]) // k)  # its tokens, ascending (on the host)
        summed.index_add_(0, torch.from_numpy(tokens).to(device), part.weighted.to(device))
        offset += count
    return combine(weighted, k, dtype, summed)


def _expect(message: MoeRoute | ShardResult, step_id: int, layer: int, micro: int, sender: str) -> None:
    if (message.step_id, message.layer, message.micro) != (step_id, layer, micro):
        raise RuntimeError(f"{sender} answered step {message.step_id} layer {message.layer} micro-batch "
                           f"{message.micro}, expected step {step_id} layer {layer} micro-batch {micro}")
