"""The expert shard: the experts of its slots in every layer (its range [a, b), plus redundant copies
and whatever a rebalance moved here: eplb.py), read as slices of the checkpoint; computes the
gate-weighted clamped-SwiGLU outputs of the assignments the router sends it and answers the replicas
they belong to directly.

Placements: the shard holds the current one and at most one staged next one. `stage` (a control call,
on another thread of the actor while the loop serves) reads only the newly assigned slices and builds
the new stacks; the first request that names the staged version switches to it, at a step boundary
(the router switches there, and every request of a step names the same version)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from cluster.config import ShardSpec, actor_device
from cluster.balancing.eplb import ExpertPlacement
from cluster.dataplane.messages import ShardRequest, ShardResult
from cluster.dataplane.names import ROUTER, SHARD_ROLE, replica_name
from cluster.telemetry import Histogram, ShardStats
from cluster.dataplane.transport import Endpoint
from model_shards.checkpoint import Checkpoint
from model_shards.expert_slots import read_slots, restack
from model_shards.moe import fused_rows, fuses_here, masked_experts, run_experts
from model_shards.syncs import Meter, host_list, host_numpy
from model_shards.weights import ExpertWeights, budget_decoded, move_to, prepare, warm_up


@dataclass
class Holding:
    """One placement's experts on this shard."""

    version: int
    slots: tuple[tuple[int, ...], ...]  # [L][S] the expert in each slot
    weights: list[ExpertWeights]  # [L] stacks in slot order


class ExpertShard:
    role = SHARD_ROLE

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.experts = spec.experts
        self.device = actor_device(spec.use_gpu)
        self.dtype = spec.source.torch_dtype
        self.bytes_read = self.slices_read = 0
        self.assignments = 0  # routed assignments computed since start (plus _dense_assignments)
        with spec.source.open() as ckpt:
            self.config = ckpt.config
            weights = [read_slots(ckpt, self.dtype, layer, ids, spec.source.keeps_mxfp4(self.device)) for layer, ids in enumerate(spec.slots)]
            self.bytes_read += ckpt.bytes_read
        self.slices_read += sum(map(len, spec.slots))
        self.current = self._ready(Holding(0, spec.slots, weights))
        warm_up(self.current.weights, spec.max_rows, 0)  # kernels go by shape: later placements reuse them
        self.staged: Holding | None = None
        self._staging = threading.Lock()  # one stage at a time
        self.step = Histogram()  # compute time per request (one layer of one micro-batch)
        self.meter = Meter()  # host syncs and ops per step, counted on request (bench, tests)
        self._dense_assignments = torch.zeros((), dtype=torch.long, device=self.device)

    def _ready(self, h: Holding) -> Holding:
        move_to(h.weights, self.device)
        prepare(h.weights)
        budget_decoded(h.weights, self.spec.source.expert_cache_bytes)
        return h

    def reset(self) -> None:
        """Stateless between messages."""

    def stage(self, placement: ExpertPlacement) -> int:
        """Build this shard's part of `placement` beside the current one, reading only the slices it
        does not hold. -> how many (layer, expert) slices were read."""
        with self._staging:
            slots = placement.shard(self.index)
            base = self.current
            if base.slots == slots:
                self.staged = Holding(placement.version, base.slots, base.weights)
                return 0
            read = 0
            weights = []
            with self.spec.source.open() as ckpt:
                for layer, (held_ids, new_ids) in enumerate(zip(base.slots, slots)):
                    if held_ids == new_ids:
                        weights.append(base.weights[layer])
                        continue
                    stack, n = restack(base.weights[layer], held_ids, new_ids,
                                       lambda ids: self._read(ckpt, layer, ids))
                    weights.append(stack)
                    read += n
                self.bytes_read += ckpt.bytes_read
            self.slices_read += read
            self.staged = self._ready(Holding(placement.version, slots, weights))
            return read

    def _read(self, ckpt: Checkpoint, layer: int, ids: list[int]) -> ExpertWeights:
        """New slices, on this shard's device (where the stacks they join live)."""
        w = read_slots(ckpt, self.dtype, layer, ids, self.spec.source.keeps_mxfp4(self.device))
        move_to(w, self.device)
        return w

    def adopt(self, placement: ExpertPlacement) -> int:
        """Stage `placement` and hold it now (recovery: the loop is stopped)."""
        read = self.stage(placement)
        self._switch(placement.version)
        return read

    def _switch(self, version: int) -> None:
        staged = self.staged
        if staged is None or staged.version != version:
            raise RuntimeError(f"shard {self.index} holds placement {self.current.version} and has "
                               f"{'nothing' if staged is None else staged.version} staged; a request needs {version}")
        self.current, self.staged = staged, None

    def compute(self, req: ShardRequest) -> list[tuple[int, ShardResult]]:
        """-> (replica, its part of the answer), in the request's replica order."""
        if req.placement != self.current.version:
            self._switch(req.placement)
        start = time.perf_counter()
        d, w = self.device, self.current.weights[req.layer]
        x, token_index, slots = req.x.to(d, self.dtype), req.token_index.to(d), req.expert_slots.to(d)
        gates = req.gates.to(d)
        counts = host_list(req.counts)  # assignments are token-major: one run per replica
        summed = not req.dense and fuses_here(w, x.shape[0], req.active)
        if req.dense:  # every assignment of the unit; -1: another shard's (router.py)
            parts = torch.split(masked_experts(x, token_index, slots, gates, w, self.config), counts)
        elif summed:  # one row per token: each replica's tokens are a run of x's rows too
            ends = host_numpy(req.token_index)[np.cumsum(counts) - 1].tolist()  # last row of each run (host)
            parts = torch.split(fused_rows(x, token_index, slots, gates, w, self.config),
                                [b - a for a, b in zip([-1, *ends[:-1]], ends)])
        else:
            parts = torch.split(run_experts(x, token_index, slots, gates, w, self.config), counts)
        elapsed = time.perf_counter() - start
        self.step.observe(elapsed)
        if req.dense:  # its own assignments, counted on the device (read by stats())
            self._dense_assignments += (slots >= 0).sum()
        else:
            self.assignments += req.expert_slots.shape[0]
        return [(r, ShardResult(req.step_id, req.layer, req.micro, part, elapsed, summed))
                for r, part in zip(host_list(req.replicas), parts)]

    def serve(self, ep: Endpoint) -> None:
        while True:
            request = ep.recv(ROUTER)
            with self.meter.measure():
                answers = self.compute(request)
            for r, part in answers:
                ep.send(replica_name(r), part)

    def stats(self) -> ShardStats:
        return ShardStats(self.bytes_read, self.step.snapshot(), self.current.version, self.slices_read,
                          self.assignments + int(self._dense_assignments), self.current.slots)
