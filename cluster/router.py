"""The router: every layer's router weights; routes each token to its top-4 experts, sends each
expert shard the rows it needs, and combines the shards' weighted outputs in (token, k) order."""

from __future__ import annotations

import time

import numpy as np
import torch

from cluster.config import RouterSpec, actor_device
from cluster.dispatch import plan_dispatch
from cluster.messages import MoeRequest, MoeResult, RouterStep, ShardRequest, ShardResult
from cluster.names import ENGINE, ROUTER_ROLE, replica_name, shard_name
from cluster.telemetry import Histogram, RouterStats
from cluster.transport import Endpoint
from model_shards.moe import combine, route
from model_shards.weights import load_routers, move_to, prepare


class Router:
    role = ROUTER_ROLE
    experts = None

    def __init__(self, spec: RouterSpec) -> None:
        self.spec = spec
        self.index = 0
        self.device = actor_device(spec.use_gpu)
        self.dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            self.config = ckpt.config
            self.routers = load_routers(ckpt, self.dtype)
        move_to(self.routers, self.device)
        prepare(self.routers)
        self.bounds = spec.shard_bounds
        self._starts = np.array([a for a, _ in self.bounds])
        cfg = self.config
        self.expert_tokens = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)  # routed counts
        self.shard_step = [Histogram() for _ in self.bounds]  # compute time per call, per shard
        self.route_s = 0.0  # see RouterStats
        self.shard_max_s = 0.0
        self._comm_s = 0.0  # sends and receives inside the current layer, not counted as routing

    def reset(self) -> None:
        """Routing state is per step; nothing to forget."""

    def moe_layer(self, step_id: int, layer: int, t: torch.Tensor, ep: Endpoint) -> torch.Tensor:
        """t [T, H] -> MoE output [T, H]: route, send each shard its assignments, combine."""
        k = self.config.experts_per_token
        expert_ids, gates = route(t, self.routers[layer], k)  # [T, K]
        ids = expert_ids.cpu().numpy()  # [T, K] the host needs them to count and to size messages
        self.expert_tokens[layer] += np.bincount(ids.reshape(-1), minlength=self.config.num_experts)
        flat_gates = gates.to(torch.float32).reshape(-1).cpu().numpy()  # [T*K] exact: shards use fp32 gates
        pending = []
        for a in plan_dispatch(ids, self._starts):
            rows = torch.from_numpy(a.rows).to(t.device)
            request = ShardRequest(step_id, layer, t[rows], torch.from_numpy(a.token_index),
                                   torch.from_numpy(a.expert_ids), torch.from_numpy(flat_gates[a.slots]))
            sent = time.perf_counter()
            ep.send(shard_name(a.shard), request)
            self._comm_s += time.perf_counter() - sent
            pending.append(a)
        weighted = torch.empty(ids.size, t.shape[1], dtype=torch.float32, device=t.device)  # every slot is filled
        slowest = 0.0
        for a in pending:  # all shards compute in parallel; collect in shard order
            s = a.shard
            waited = time.perf_counter()
            result: ShardResult = ep.recv(shard_name(s))
            self._comm_s += time.perf_counter() - waited
            slowest = max(slowest, result.compute_s)
            if (result.step_id, result.layer) != (step_id, layer):
                raise RuntimeError(f"shard {s} answered step {result.step_id} layer {result.layer}")
            weighted[torch.from_numpy(a.slots).to(t.device)] = result.weighted.to(t.device)
            self.shard_step[s].observe(result.compute_s)
        self.shard_max_s += slowest
        return combine(weighted, k, t.dtype)

    def serve(self, ep: Endpoint) -> None:
        while True:
            self.run(ep.recv(ENGINE), ep)

    def run(self, header: RouterStep, ep: Endpoint) -> None:
        for layer in range(self.config.num_hidden_layers):
            requests: list[MoeRequest] = [ep.recv(replica_name(r)) for r in header.replicas]
            started, self._comm_s = time.perf_counter(), 0.0
            sizes = [q.t.shape[0] for q in requests]
            t = torch.cat([q.t for q in requests]).to(self.device)
            y = self.moe_layer(header.step_id, layer, t, ep)
            parts = torch.split(y, sizes)
            self.route_s += time.perf_counter() - started - self._comm_s
            for r, part in zip(header.replicas, parts):
                ep.send(replica_name(r), MoeResult(header.step_id, layer, part))

    def stats(self) -> RouterStats:
        return RouterStats(tuple(self.expert_tokens.sum(0).tolist()), tuple(h.snapshot() for h in self.shard_step),
                           self.route_s, self.shard_max_s)
