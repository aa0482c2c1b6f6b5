"""The one place where Ray wraps plain classes into actors (the roles, and the hop probe).

A `PlaneMember` holds one role object (roles.py) and its data-plane endpoint. Its `serve` method
runs the role's loop and only returns when the loop ends, so the engine learns of a dead actor or
a crashed loop from that call's object ref, without polling. The actor is threaded
(max_concurrency) so that `stop`, `ping` and `stats` are answered while `serve` runs.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch

from cluster.config import ReplicaSpec, RouterSpec, ShardSpec
from cluster.hop import EchoPeer
from cluster.messages import ActorInfo
from cluster.roles import ROLES, ROUTER, replica_name, shard_name
from cluster.transport import Endpoint, PlaneSpec, StreamClosed

Spec = ReplicaSpec | RouterSpec | ShardSpec


def member_name(role: str, index: int) -> str:
    if role == "attention_replica":
        return replica_name(index)
    if role == "expert_shard":
        return shard_name(index)
    return ROUTER


class PlaneMember:
    def __init__(self, role: str, spec: Spec, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.obj = ROLES[role](spec)
        self.name = member_name(role, self.obj.index)
        self.endpoint: Endpoint | None = None
        self._stopping = False

    def ping(self) -> int:
        return os.getpid()

    def info(self) -> ActorInfo:
        experts = list(self.obj.spec.experts) if self.obj.role == "expert_shard" else None
        return ActorInfo(self.obj.role, self.obj.index, os.getpid(), ray.get_runtime_context().get_node_id(),
                         str(self.obj.device), experts)

    def listen(self, plane: PlaneSpec) -> dict[str, Any]:
        if self.endpoint is not None:
            self.endpoint.close()
        self.endpoint = Endpoint(self.name, host=ray.util.get_node_ip_address())
        return self.endpoint.listen(plane)

    def connect(self, plane: PlaneSpec, addresses: dict[str, Any]) -> None:
        assert self.endpoint is not None
        self.endpoint.connect(plane, addresses)
        self._stopping = False

    def serve(self) -> str:
        assert self.endpoint is not None
        try:
            return self.obj.serve(self.endpoint)
        except StreamClosed:
            if self._stopping:
                return "stopped"
            raise

    def stop(self) -> None:
        self._stopping = True
        if self.endpoint is not None:
            self.endpoint.stop()

    def reset(self) -> None:
        self.obj.reset()

    def stats(self) -> dict[str, Any]:
        return self.obj.stats()


RemoteMember = ray.remote(max_concurrency=4)(PlaneMember)
RemoteEcho = ray.remote(EchoPeer)
