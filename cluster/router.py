"""The router: every layer's router weights; routes each token to its top-4 experts and sends each
expert shard the rows it needs, and each replica where its shards' answers go (the shards answer the
replicas directly, which combine in (token, k) order)."""

from __future__ import annotations

import time

import numpy as np
import torch

from cluster.config import RouterSpec, actor_device
from cluster.dispatch import owners, plan_dispatch, replica_shares
from cluster.messages import MoeRequest, MoeRoute, RouterStep, ShardRequest
from cluster.names import ENGINE, ROUTER_ROLE, replica_name, shard_name
from cluster.telemetry import RouterStats
from cluster.transport import Endpoint
from model_shards.moe import route
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
        self.route_s = 0.0  # see RouterStats
        self._comm_s = 0.0  # sends and receives inside the current unit, not counted as routing

    def reset(self) -> None:
        """Routing state is per step; nothing to forget."""

    def dispatch(self, step_id: int, layer: int, micro: int, t: torch.Tensor, replicas: list[int],
                 sizes: list[int], ep: Endpoint) -> None:
        """t [T, H] (the rows of `replicas`, `sizes` each, concatenated) -> each shard its assignments,
        each replica its MoeRoute. Nothing comes back here."""
        k = self.config.experts_per_token
        expert_ids, gates = route(t, self.routers[layer], k)  # [T, K]
        ids = expert_ids.cpu().numpy()  # [T, K] the host needs them to count and to size messages
        self.expert_tokens[layer] += np.bincount(ids.reshape(-1), minlength=self.config.num_experts)
        flat_gates = gates.to(torch.float32).reshape(-1).cpu().numpy()  # [T*K] exact: shards use fp32 gates
        plan = plan_dispatch(ids, self._starts)
        owned, per_shard = np.array(replicas, dtype=np.int64), owners(plan, sizes, k)
        for a, counts in zip(plan, per_shard):
            rows, present = torch.from_numpy(a.rows).to(t.device), counts > 0
            self._send(ep, shard_name(a.shard), ShardRequest(
                step_id, layer, micro, t[rows], torch.from_numpy(a.token_index), torch.from_numpy(a.expert_ids),
                torch.from_numpy(flat_gates[a.slots]), torch.from_numpy(owned[present]),
                torch.from_numpy(counts[present])))
        for share in replica_shares(plan, per_shard, sizes, k):
            self._send(ep, replica_name(replicas[share.replica]), MoeRoute(
                step_id, layer, micro, torch.from_numpy(share.shards), torch.from_numpy(share.counts),
                torch.from_numpy(share.slots)))

    def _send(self, ep: Endpoint, peer: str, message: ShardRequest | MoeRoute) -> None:
        sent = time.perf_counter()
        ep.send(peer, message)
        self._comm_s += time.perf_counter() - sent

    def serve(self, ep: Endpoint) -> None:
        while True:
            self.run(ep.recv(ENGINE), ep)

    def run(self, header: RouterStep, ep: Endpoint) -> None:
        """Units (layer, m) in the replicas' own order (messages.py): the m-th micro-batch of every
        replica that has one."""
        for layer in range(self.config.num_hidden_layers):
            for micro in range(max(header.micro)):
                replicas = [r for r, n in zip(header.replicas, header.micro) if micro < n]
                requests: list[MoeRequest] = [ep.recv(replica_name(r)) for r in replicas]
                started, self._comm_s = time.perf_counter(), 0.0
                for r, q in zip(replicas, requests):
                    if (q.step_id, q.layer, q.micro) != (header.step_id, layer, micro):
                        raise RuntimeError(f"replica {r} sent step {q.step_id} layer {q.layer} micro-batch "
                                           f"{q.micro}, expected step {header.step_id} layer {layer} "
                                           f"micro-batch {micro}")
                t = torch.cat([q.t for q in requests]).to(self.device)
                self.dispatch(header.step_id, layer, micro, t, replicas, [q.t.shape[0] for q in requests], ep)
                self.route_s += time.perf_counter() - started - self._comm_s

    def stats(self) -> RouterStats:
        shards = np.add.reduceat(self.expert_tokens, self._starts, axis=1)  # [L, M]
        return RouterStats(tuple(self.expert_tokens.sum(0).tolist()), tuple(map(tuple, shards.tolist())), self.route_s)
