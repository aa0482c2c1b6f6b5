"""Which expert shard gets which routed assignments: the router's bookkeeping, as one pure function.

Numpy on the host: the router needs the expert ids there anyway (to count them and to size each
shard's message), and for the few assignments of a decode step numpy's small calls cost no more
than the torch ops they replace (measured in a loop that runs the shards in between, at batch 1:
about 0.5 ms of router work per layer either way, most of it cache misses after the experts ran).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardAssignments:
    shard: int
    rows: np.ndarray  # [R] distinct token rows the shard needs, ascending
    slots: np.ndarray  # [N] positions t*K + k of its assignments, token-major
    token_index: np.ndarray  # [N] index into rows of each assignment's token
    expert_ids: np.ndarray  # [N] global expert id of each assignment


def plan_dispatch(expert_ids: np.ndarray, starts: np.ndarray) -> list[ShardAssignments]:
    """expert_ids [T, K] (top-k per token), starts [M] (first expert of each shard, ascending, starts[0] == 0)
    -> one ShardAssignments per shard that has any, in shard order. Every (t, k) lands in exactly one."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [T*K] token-major
    shard_of = np.searchsorted(starts, flat, side="right") - 1  # [T*K]
    order = np.argsort(shard_of, kind="stable")  # grouped by shard, token-major inside each group
    counts = np.bincount(shard_of, minlength=len(starts))
    out, offset = [], 0
    for shard, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        slots = order[offset:offset + count]
        offset += count
        rows, token_index = np.unique(slots // k, return_inverse=True)
        out.append(ShardAssignments(shard, rows, slots, token_index, flat[slots]))
    return out
