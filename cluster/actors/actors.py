"""The one place where Ray wraps the roles into actors.

A `PlaneMember` holds one role object (roles.py) and its data-plane endpoint. Its `serve` method
runs the role's loop and only returns when the loop ends, so the engine learns of a dead actor or
a crashed loop from that call's object ref, without polling. The actor is threaded
(max_concurrency) so that `stop`, `ping` and `stats` are answered while `serve` runs.
"""

from __future__ import annotations

import os

import ray
import torch

from cluster.balancing.eplb import ExpertPlacement
from cluster.dataplane.messages import ActorInfo
from cluster.dataplane.names import REPLICA_ROLE, ROUTER_ROLE, SHARD_ROLE, member_name
from cluster.actors.roles import Role, Spec, make_role
from cluster.actors.router import Router
from cluster.actors.shard import ExpertShard
from cluster.telemetry import ExpertLoad, ReplicaStats, RouterStats, ShardStats
from cluster.dataplane.transport import Address, Endpoint, PlaneSpec, StreamClosed
from model_shards.allocator import keep_freed_memory
from model_shards.capabilities import cpu_features
from model_shards.syncs import DispatchCount


class PlaneMember:
    def __init__(self, role: str, spec: Spec, threads: int) -> None:
        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        keep_freed_memory()
        self.dtype = spec.source.dtype
        self.obj: Role = make_role(role, spec)
        self.name = member_name(role, self.obj.index)
        self.endpoint: Endpoint | None = None
        self._stopping = False

    def ping(self) -> int:
        return os.getpid()

    def info(self) -> ActorInfo:
        experts = list(self.obj.experts) if self.obj.experts is not None else None
        return ActorInfo(self.obj.role, self.obj.index, os.getpid(), ray.get_runtime_context().get_node_id(),
                         str(self.obj.device), experts, self.threads, self.dtype, cpu_features().summary())

    def listen(self, plane: PlaneSpec) -> dict[str, Address]:
        if self.endpoint is not None:
            self.endpoint.close()
        self.endpoint = Endpoint(self.name, host=ray.util.get_node_ip_address())
        return self.endpoint.listen(plane)

    def connect(self, plane: PlaneSpec, addresses: dict[str, Address]) -> None:
        assert self.endpoint is not None
        self.endpoint.connect(plane, addresses)
        self._stopping = False

    def serve(self) -> str:
        """Runs the role's loop; returns "stopped" once `stop` ended it (anything else is a failure)."""
        assert self.endpoint is not None
        torch.set_num_threads(self.threads)  # per calling thread (see LocalExecutor.enter_thread)
        try:
            self.obj.serve(self.endpoint)
        except StreamClosed:
            if self._stopping:
                return "stopped"
            raise
        return "ended"

    def stop(self) -> None:
        self._stopping = True
        if self.endpoint is not None:
            self.endpoint.stop()

    def reset(self) -> None:
        self.obj.reset()

    def start_counting(self) -> None:
        """Count host syncs and ops of the data-plane messages from now on (syncs.py)."""
        self.obj.meter.start()

    def stop_counting(self) -> DispatchCount:
        return self.obj.meter.stop()

    def stats(self) -> ReplicaStats | RouterStats | ShardStats:
        return self.obj.stats()

    # -- expert placement (rebalance.py): the router and the shards store it --------------------
    def expert_load(self) -> ExpertLoad:
        assert isinstance(self.obj, Router)
        return self.obj.expert_load()

    def stage(self, placement: ExpertPlacement) -> int:
        assert isinstance(self.obj, ExpertShard)
        return self.obj.stage(placement)

    def adopt(self, placement: ExpertPlacement) -> None:
        assert isinstance(self.obj, (Router, ExpertShard))
        self.obj.adopt(placement)


# One actor class per role, so that `ps`, Ray's dashboard and `ray list actors` name each process by
# its role (Ray titles a worker process after its actor class: ray::AttentionReplicaActor).
class AttentionReplicaActor(PlaneMember):
    pass


class RouterActor(PlaneMember):
    pass


class ExpertShardActor(PlaneMember):
    pass


REMOTE_MEMBERS = {role: ray.remote(max_concurrency=4)(cls) for role, cls in
                  ((REPLICA_ROLE, AttentionReplicaActor), (ROUTER_ROLE, RouterActor), (SHARD_ROLE, ExpertShardActor))}
