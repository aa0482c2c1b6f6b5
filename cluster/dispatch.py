"""Which expert shard gets which routed assignments, and which replica gets which answers: the
router's bookkeeping, as pure functions.

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


@dataclass(frozen=True)
class ReplicaShare:
    """One replica's part of a unit's assignments, as the shards and the replica need it."""

    replica: int  # position in the unit's replica order
    shards: np.ndarray  # [S'] the shards holding some of its assignments, ascending
    counts: np.ndarray  # [S'] how many each
    slots: np.ndarray  # [N_r] replica-local t*K + k of each, grouped by shard in that order


def owners(plan: list[ShardAssignments], sizes: list[int], k: int) -> list[np.ndarray]:
    """Per shard of `plan`: [P] assignments of each replica (rows `sizes` each, concatenated in order).
    A shard's assignments are token-major, so each replica's are one contiguous run of them."""
    ends = np.cumsum(sizes) * k  # [P] slot end of each replica
    return [np.bincount(np.searchsorted(ends, a.slots, side="right"), minlength=len(sizes)) for a in plan]


def replica_shares(plan: list[ShardAssignments], per_shard: list[np.ndarray], sizes: list[int],
                   k: int) -> list[ReplicaShare]:
    """Per replica (in order): which shards answer it and where their rows go in its [T_r * K] slots.
    `per_shard`: owners(plan, sizes, k)."""
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) * k  # [P] first slot of each replica
    shares = []
    for r, start in enumerate(starts.tolist()):
        shards, counts, slots = [], [], []
        for a, count in zip(plan, per_shard):
            n = int(count[r])
            if n:
                first = int(count[:r].sum())  # this replica's run inside the shard's assignments
                shards.append(a.shard)
                counts.append(n)
                slots.append(a.slots[first:first + n] - start)
        shares.append(ReplicaShare(r, np.array(shards, dtype=np.int64), np.array(counts, dtype=np.int64),
                                   np.concatenate(slots).astype(np.int64) if slots else np.zeros(0, np.int64)))
    return shares
