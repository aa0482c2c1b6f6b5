"""The router: every layer's router weights; routes each token to its top-4 experts and sends each
expert shard the rows it needs, and each replica where its shards' answers go (the shards answer the
replicas directly, which combine in (token, k) order).

It routes by the expert placement the executor gives it (at start, then with a RouterStep: eplb.py)
and keeps the per-expert counts of the last `window` steps, which the executor reads to rebalance.

Two ways to dispatch a unit. The host's: the expert ids come to the host, which plans each shard's
rows and assignments (dispatch.py): the fewest bytes, but a read of the device per layer. The
device's (units up to `device_dispatch_rows` rows, RouterSpec): every shard gets all the unit's rows
and routing, with -1 where another shard serves an assignment, and answers every assignment (zero
where not its own), which the replicas sum; counts stay on the device until the step ends. Nothing
is read on the host per layer: a GPU's queue never drains mid-step."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
import torch

from cluster.config import RouterSpec, actor_device
from cluster.balancing.dispatch import (CopyTable, DeviceCopies, copies_on_device, copy_table, device_copies, owners,
                                        plan_dispatch, replica_shares)
from cluster.balancing.eplb import ExpertPlacement
from cluster.dataplane.messages import MoeRequest, MoeRoute, RouterStep, ShardRequest
from cluster.dataplane.names import ENGINE, ROUTER_ROLE, replica_name, shard_name
from cluster.telemetry import ExpertLoad, RouterStats
from cluster.dataplane.transport import Endpoint
from model_shards.moe import route
from model_shards.syncs import Meter
from model_shards.weights import load_routers, move_to, prepare, warm_up


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
        warm_up(self.routers, spec.max_rows, 0)
        cfg = self.config
        self.adopt(spec.placement)
        self.expert_tokens = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)  # routed counts
        self.shard_tokens = np.zeros((cfg.num_hidden_layers, len(spec.placement.capacity)), dtype=np.int64)
        # per step, the last spec.window steps: ([L, E] per expert, [L, M] per shard) and their sums
        self._window: deque[tuple[np.ndarray, np.ndarray]] = deque()
        self._window_sum, self._window_shards = np.zeros_like(self.expert_tokens), np.zeros_like(self.shard_tokens)
        self._step_counts, self._step_shards = np.zeros_like(self.expert_tokens), np.zeros_like(self.shard_tokens)
        # the device's dispatch counts here during a step ([L, E] per expert, then [L, M] per shard)
        self._on_device = torch.zeros(cfg.num_hidden_layers, cfg.num_experts + len(spec.placement.capacity),
                                      dtype=torch.long, device=self.device)
        self._device_units = False  # whether this step dispatched any unit the device's way
        self._lock = threading.Lock()  # the window is read by expert_load on another thread
        self.route_s = 0.0  # see RouterStats
        self._comm_s = 0.0  # sends and receives inside the current unit, not counted as routing
        self.meter = Meter()  # host syncs and ops per step, counted on request (bench, tests)

    def reset(self) -> None:
        """Routing state is per step; nothing to forget."""

    def adopt(self, placement: ExpertPlacement) -> None:
        if hasattr(self, "shard_tokens") and len(placement.capacity) != self.shard_tokens.shape[1]:
            self._resize_shards(len(placement.capacity))  # a resize changed the shard count (resize.py)
        self.placement = placement
        self.tables: list[CopyTable] = [copy_table(slots, self.config.num_experts) for slots in placement.layers]
        self.copies: list[DeviceCopies] = [device_copies(slots, self.config.num_experts, self.device)
                                           for slots in placement.layers] if self.spec.device_dispatch_rows else []

    def _resize_shards(self, m: int) -> None:
        """Per-shard counts for `m` shards: the surviving shards keep theirs, new ones start at zero
        (between steps: the step's counts are empty)."""
        def fit(a: np.ndarray) -> np.ndarray:
            out = np.zeros((a.shape[0], m), dtype=a.dtype)
            n = min(m, a.shape[1])
            out[:, :n] = a[:, :n]
            return out

        with self._lock:
            self.shard_tokens, self._window_shards, self._step_shards = (
                fit(self.shard_tokens), fit(self._window_shards), fit(self._step_shards))
            self._window = deque((experts, fit(shards)) for experts, shards in self._window)
        self._on_device = torch.zeros(self.config.num_hidden_layers, self.config.num_experts + m, dtype=torch.long,
                                      device=self.device)

    def expert_load(self) -> ExpertLoad:
        """Routed assignments per layer and expert over the last `window` steps."""
        with self._lock:
            return ExpertLoad(len(self._window), self._window_sum.copy())

    def _end_step(self) -> None:
        if self._device_units:  # the device's counts of this step: the step's one read
            self._device_units = False
            e = self.config.num_experts
            counts = self._on_device.to("cpu", copy=True).numpy()  # a copy: the counter is zeroed next
            self._on_device.zero_()
            for cumulative, step, part in ((self.expert_tokens, self._step_counts, counts[:, :e]),
                                           (self.shard_tokens, self._step_shards, counts[:, e:])):
                cumulative += part
                step += part
        with self._lock:
            self._window.append((self._step_counts, self._step_shards))
            self._window_sum += self._step_counts
            self._window_shards += self._step_shards
            if len(self._window) > self.spec.window:
                experts, shards = self._window.popleft()
                self._window_sum -= experts
                self._window_shards -= shards
        self._step_counts, self._step_shards = np.zeros_like(self.expert_tokens), np.zeros_like(self.shard_tokens)

    def dispatch(self, step_id: int, layer: int, micro: int, t: torch.Tensor, replicas: list[int],
                 sizes: list[int], ep: Endpoint) -> None:
        """t [T, H] (the rows of `replicas`, `sizes` each, concatenated) -> each shard its assignments,
        each replica its MoeRoute. Nothing comes back here."""
        k = self.config.experts_per_token
        expert_ids, gates = route(t, self.routers[layer], k)  # [T, K]
        if t.shape[0] <= self.spec.device_dispatch_rows:
            return self._dispatch_on_device(step_id, layer, micro, t, expert_ids, gates, replicas, sizes, ep)
        ids = expert_ids.cpu().numpy()  # [T, K] the host needs them to count and to size messages
        counts = np.bincount(ids.reshape(-1), minlength=self.config.num_experts)
        self.expert_tokens[layer] += counts
        self._step_counts[layer] += counts
        flat_gates = gates.to(torch.float32).reshape(-1).cpu().numpy()  # [T*K] exact: shards use fp32 gates
        plan = plan_dispatch(ids, self.tables[layer])
        owned, per_shard = np.array(replicas, dtype=np.int64), owners(plan, sizes, k)
        for a, counts in zip(plan, per_shard):
            present = counts > 0
            # a shard that needs every row (hot experts, large batches) gets t itself, not a gathered copy
            x = t if len(a.rows) == t.shape[0] else t[torch.from_numpy(a.rows).to(t.device)]
            self.shard_tokens[layer, a.shard] += len(a.slots)
            self._step_shards[layer, a.shard] += len(a.slots)
            self._send(ep, shard_name(a.shard), ShardRequest(
                step_id, layer, micro, x, torch.from_numpy(a.token_index), torch.from_numpy(a.expert_slots),
                torch.from_numpy(flat_gates[a.slots]), torch.from_numpy(owned[present]),
                torch.from_numpy(counts[present]), self.placement.version, len(np.unique(a.expert_slots))))
        for share in replica_shares(plan, per_shard, sizes, k):
            self._send(ep, replica_name(replicas[share.replica]), MoeRoute(
                step_id, layer, micro, torch.from_numpy(share.shards), torch.from_numpy(share.counts),
                torch.from_numpy(share.slots)))

    def _dispatch_on_device(self, step_id: int, layer: int, micro: int, t: torch.Tensor, expert_ids: torch.Tensor,
                            gates: torch.Tensor, replicas: list[int], sizes: list[int], ep: Endpoint) -> None:
        """The device's dispatch of one unit (module docstring): nothing read on the host."""
        k, e, shards = self.config.experts_per_token, self.config.num_experts, len(self.placement.capacity)
        shard_of, slot_of = copies_on_device(expert_ids, self.copies[layer])  # [T*K] each
        ones = torch.ones_like(shard_of)
        self._device_units = True
        self._on_device[layer, :e].index_add_(0, expert_ids.reshape(-1), ones)
        self._on_device[layer, e:].index_add_(0, shard_of, ones)
        token_index = torch.arange(t.shape[0], device=t.device)[:, None].expand(-1, k).reshape(-1)  # [T*K]
        flat_gates = gates.to(torch.float32).reshape(-1)  # [T*K] exact: shards use fp32 gates
        owned = torch.tensor(replicas, dtype=torch.long)
        per_replica = torch.tensor([n * k for n in sizes], dtype=torch.long)  # assignments, token-major
        for shard in range(shards):
            self._send(ep, shard_name(shard), ShardRequest(
                step_id, layer, micro, t, token_index, torch.where(shard_of == shard, slot_of, -1), flat_gates,
                owned, per_replica, self.placement.version, 0, True))
        every = torch.arange(shards, dtype=torch.long)
        for replica, n in zip(replicas, sizes):
            self._send(ep, replica_name(replica), MoeRoute(step_id, layer, micro, every,
                                                           torch.full((shards,), n * k, dtype=torch.long),
                                                           torch.empty(0, dtype=torch.long), True))

    def _send(self, ep: Endpoint, peer: str, message: ShardRequest | MoeRoute) -> None:
        sent = time.perf_counter()
        ep.send(peer, message)
        self._comm_s += time.perf_counter() - sent

    def serve(self, ep: Endpoint) -> None:
        while True:
            header = ep.recv(ENGINE)
            with self.meter.measure():
                self.run(header, ep)

    def run(self, header: RouterStep, ep: Endpoint) -> None:
        """Units (layer, m) in the replicas' own order (messages.py): the m-th micro-batch of every
        replica that has one."""
        if header.placement is not None:
            self.adopt(header.placement)
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
        self._end_step()

    def stats(self) -> RouterStats:
        with self._lock:
            recent = tuple(map(tuple, self._window_shards.tolist()))
        return RouterStats(tuple(self.expert_tokens.sum(0).tolist()), tuple(map(tuple, self.shard_tokens.tolist())),
                           self.route_s, self.placement.version, recent)
