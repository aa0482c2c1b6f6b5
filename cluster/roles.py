"""The three actor roles as plain classes: attention replica, router, expert shard.

Each loads only its own weights, then `serve`s: a loop over data-plane messages that ends when the
endpoint is stopped (StreamClosed) or a `Stop` arrives. Ray wraps them in one place (actors.py);
tests can also run them in threads of one process.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from cluster.config import ReplicaSpec, RouterSpec, ShardSpec
from cluster.dispatch import plan_dispatch
from cluster.messages import (MoeRequest, MoeResult, ReplicaStep, RouterStep, ShardRequest, ShardResult, StepResult,
                              Stop)
from cluster.stats import Histogram
from cluster.step import run_replica_step
from cluster.transport import Endpoint
from model_shards.kv_cache import KVCache
from model_shards.model import GptOssModel
from model_shards.moe import combine, route, run_experts
from model_shards.weights import ModelWeights, load_attention, load_experts, load_globals, load_routers, move_to

ENGINE = "engine"
ROUTER = "router"


def replica_name(i: int) -> str:
    return f"replica{i}"


def shard_name(i: int) -> str:
    return f"shard{i}"


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class AttentionReplica:
    role = "attention_replica"

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.device = _device(spec.use_gpu)
        dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            weights = ModelWeights(ckpt.config, load_globals(ckpt, dtype), load_attention(ckpt, dtype), [], [])
        move_to(weights, self.device)
        self.model = GptOssModel(weights)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence (after a failure the engine re-prefills them)."""
        kv = self.spec.kv
        self.kv = KVCache(self.model.config, kv.num_blocks, kv.max_seqs, kv.block_size, self.model.dtype, self.device)

    def serve(self, ep: Endpoint) -> str:
        while True:
            step = ep.recv(ENGINE)
            if isinstance(step, Stop):
                return step.reason
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

        sampled = run_replica_step(self.model, self.kv, step, moe)
        return StepResult(step.step_id, self.index, sampled, time.perf_counter() - start - waited, waited,
                          self.kv.usage())

    def stats(self) -> dict[str, float]:
        return {"kv_usage": self.kv.usage(), "kv_free_blocks": float(self.kv.free_blocks)}


class Router:
    role = "router"

    def __init__(self, spec: RouterSpec) -> None:
        self.spec = spec
        self.index = 0
        self.device = _device(spec.use_gpu)
        self.dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            self.config = ckpt.config
            self.routers = load_routers(ckpt, self.dtype)
        move_to(self.routers, self.device)
        self.bounds = spec.shard_bounds
        self._starts = np.array([a for a, _ in self.bounds])
        cfg = self.config
        self.expert_tokens = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)  # routed counts
        self.shard_compute_s = [0.0] * len(self.bounds)
        self.shard_calls = [0] * len(self.bounds)
        self.shard_step = [Histogram() for _ in self.bounds]  # compute time per call, per shard
        # Per-layer timing, summed: the router's own compute (routing, dispatch indices, combine;
        # not its sends and receives) and the slowest shard's compute. What a replica waits for the
        # MoE beyond these two is the data plane.
        self.route_s = 0.0
        self.shard_max_s = 0.0
        self.layers_run = 0
        self._comm_s = 0.0

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
            self.shard_compute_s[s] += result.compute_s
            self.shard_calls[s] += 1
            self.shard_step[s].observe(result.compute_s)
        self.shard_max_s += slowest
        return combine(weighted, k, t.dtype)

    def serve(self, ep: Endpoint) -> str:
        while True:
            header = ep.recv(ENGINE)
            if isinstance(header, Stop):
                return header.reason
            self.run(header, ep)

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
            self.layers_run += 1

    def stats(self) -> dict[str, object]:
        return {"expert_tokens": self.expert_tokens.sum(0).tolist(),
                "shard_compute_s": list(self.shard_compute_s), "shard_calls": list(self.shard_calls),
                "route_s": self.route_s, "shard_max_s": self.shard_max_s, "layers_run": self.layers_run,
                "shard_step": [h.snapshot() for h in self.shard_step]}


class ExpertShard:
    role = "expert_shard"

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.device = _device(spec.use_gpu)
        self.dtype = spec.source.torch_dtype
        with spec.source.open() as ckpt:
            self.config = ckpt.config
            self.experts = load_experts(ckpt, self.dtype, experts=spec.experts, keep_mxfp4=spec.keep_mxfp4)
            self.bytes_read = ckpt.bytes_read
        move_to(self.experts, self.device)

    def reset(self) -> None:
        """Stateless between messages."""

    def compute(self, req: ShardRequest) -> ShardResult:
        start = time.perf_counter()
        d = self.device
        weighted = run_experts(req.x.to(d, self.dtype), req.token_index.to(d), req.expert_ids.to(d), req.gates.to(d),
                               self.experts[req.layer], self.config)
        return ShardResult(req.step_id, req.layer, weighted, time.perf_counter() - start)

    def serve(self, ep: Endpoint) -> str:
        while True:
            req = ep.recv(ROUTER)
            if isinstance(req, Stop):
                return req.reason
            ep.send(ROUTER, self.compute(req))

    def stats(self) -> dict[str, float]:
        return {"bytes_read": float(self.bytes_read), "pid": float(os.getpid())}


ROLES = {AttentionReplica.role: AttentionReplica, Router.role: Router, ExpertShard.role: ExpertShard}
