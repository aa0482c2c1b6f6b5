"""Names of the data plane's participants (channel ends) and of the three actor roles."""

from __future__ import annotations

ENGINE = "engine"
ROUTER = "router"

REPLICA_ROLE = "attention_replica"
ROUTER_ROLE = "router"
SHARD_ROLE = "expert_shard"


def replica_name(i: int) -> str:
    return f"replica{i}"


def shard_name(i: int) -> str:
    return f"shard{i}"


def member_name(role: str, index: int) -> str:
    if role == REPLICA_ROLE:
        return replica_name(index)
    if role == SHARD_ROLE:
        return shard_name(index)
    return ROUTER
