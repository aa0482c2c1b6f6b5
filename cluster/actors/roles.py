"""The three actor roles behind one small protocol: attention replica (replica.py), router
(router.py) and expert shard (shard.py).

Each role is a plain class that loads only its own weights, then `serve`s: a loop over data-plane
messages in the order messages.py writes down, until its endpoint is stopped (the loop then ends
with StreamClosed). Ray wraps them in one place (actors.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from cluster.config import ReplicaSpec, RouterSpec, ShardSpec
from cluster.dataplane.names import REPLICA_ROLE, ROUTER_ROLE, SHARD_ROLE
from cluster.actors.replica import AttentionReplica
from cluster.actors.router import Router
from cluster.actors.shard import ExpertShard
from cluster.telemetry import ReplicaStats, RouterStats, ShardStats
from cluster.dataplane.transport import Endpoint
from model_shards.syncs import Meter

Spec = ReplicaSpec | RouterSpec | ShardSpec


class Role(Protocol):
    role: str  # REPLICA_ROLE | ROUTER_ROLE | SHARD_ROLE
    index: int
    device: torch.device
    meter: Meter  # counts host syncs and ops of the loop's messages, on request

    @property
    def experts(self) -> tuple[int, int] | None:
        """[a, b) for an expert shard; None for the other roles."""

    def serve(self, ep: Endpoint) -> None:
        """Run the data-plane loop until the endpoint is stopped (raises StreamClosed then)."""

    def reset(self) -> None:
        """Forget every sequence's state (after a failure the engine prefills them again)."""

    def stats(self) -> ReplicaStats | RouterStats | ShardStats: ...


def make_role(role: str, spec: Spec) -> Role:
    if role == REPLICA_ROLE and isinstance(spec, ReplicaSpec):
        return AttentionReplica(spec)
    if role == ROUTER_ROLE and isinstance(spec, RouterSpec):
        return Router(spec)
    if role == SHARD_ROLE and isinstance(spec, ShardSpec):
        return ExpertShard(spec)
    raise ValueError(f"no role {role!r} for a {type(spec).__name__}")
