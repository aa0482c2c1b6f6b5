"""Which expert shard (and which copy of a replicated expert) gets which routed assignments, and
which replica gets which answers: the router's bookkeeping, as pure functions.

Numpy on the host: the router needs the expert ids there anyway (to count them and to size each
shard's message), and for the few assignments of a decode step numpy's small calls cost no more
than the torch ops they replace (timed in a loop that runs the shards in between, most of the
router's time either way is cache misses after the experts ran: docs/measurements.md).

The device's dispatch (router.py) reads nothing on the host: `DeviceCopies` and `copies_on_device`
choose each assignment's copy with tensor ops, by a fixed rule (a replicated expert's assignments
alternate over its copies by token), not by the step's load as `choose_copies` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ShardAssignments:
    shard: int
    rows: np.ndarray  # [R] distinct token rows the shard needs, ascending
    slots: np.ndarray  # [N] positions t*K + k of its assignments, token-major
    token_index: np.ndarray  # [N] index into rows of each assignment's token
    expert_slots: np.ndarray  # [N] the slot of the shard's expert stack (this layer) that serves each


@dataclass(frozen=True)
class CopyTable:
    """One layer of a placement (eplb.py) as the router reads it."""

    shard: np.ndarray  # [E] the shard of each expert's first copy
    slot: np.ndarray  # [E] its slot there
    replicated: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]  # (expert, shards, slots) with 2+ copies
    num_shards: int


def copy_table(slots: tuple[tuple[int, ...], ...], num_experts: int) -> CopyTable:
    """slots [M][S_m] (the experts in each shard's slots) -> the router's table."""
    where = copies_of(slots, num_experts)
    replicated = tuple((e, tuple(s for s, _ in w), tuple(i for _, i in w)) for e, w in enumerate(where) if len(w) > 1)
    return CopyTable(np.array([w[0][0] for w in where]), np.array([w[0][1] for w in where]), replicated, len(slots))


def copies_of(slots: tuple[tuple[int, ...], ...], num_experts: int) -> list[list[tuple[int, int]]]:
    """slots [M][S_m] -> per expert, its copies as (shard, slot), in shard order; every expert needs one."""
    where: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
    for shard, held in enumerate(slots):
        for slot, e in enumerate(held):
            where[e].append((shard, slot))
    if any(not w for w in where):
        raise ValueError(f"experts {[e for e, w in enumerate(where) if not w]} have no copy")
    return where


def range_table(starts: np.ndarray, num_experts: int) -> CopyTable:
    """Contiguous ranges, one copy each: shard m holds [starts[m], starts[m + 1])."""
    ends = [*starts[1:].tolist(), num_experts]
    return copy_table(tuple(tuple(range(a, b)) for a, b in zip(starts.tolist(), ends)), num_experts)


def water_fill(loads: list[int], n: int) -> list[int]:
    """loads [C] (assignments each copy's shard has so far in the step), n more -> how many each copy
    takes [C]: the least-loaded first, the lowest position on ties, as if handed out one at a time.
    Plain Python: C is a handful, and numpy's per-call cost would dominate."""
    order = sorted(range(len(loads)), key=lambda c: (loads[c], c))
    level, k, left = loads[order[0]], 1, n
    while k < len(order) and left >= (loads[order[k]] - level) * k:
        left -= (loads[order[k]] - level) * k
        level, k = loads[order[k]], k + 1
    raise_to, extra = level + left // k, left % k
    take = [0] * len(loads)
    for rank, c in enumerate(sorted(order[:k])):  # at the common level ties go by position
        take[c] = raise_to - loads[c] + (rank < extra)
    return take


def choose_copies(flat: np.ndarray, table: CopyTable) -> tuple[np.ndarray, np.ndarray]:
    """flat [N] expert ids (token-major) -> (shard [N], slot [N]) of the copy serving each. Experts with
    one copy are fixed; then each replicated expert (busiest first) goes whole to its least-loaded copy
    when that shard stays within an even share of the step's assignments (a split costs every copy a
    read of the expert's weights), else it is split over its copies least-loaded first, each copy
    taking a contiguous run. Deterministic, and every assignment is served exactly once."""
    shard, slot = table.shard[flat], table.slot[flat]
    if not table.replicated:
        return shard, slot
    counts = np.bincount(flat, minlength=len(table.shard)).tolist()
    reps = sorted(((counts[e], e, shards, slots) for e, shards, slots in table.replicated if counts[e]),
                  key=lambda r: (-r[0], r[1]))
    load = np.bincount(shard, minlength=table.num_shards).tolist()
    for n, _, shards, _ in reps:
        load[shards[0]] -= n  # counted at its first copy above: not placed yet
    even = -(-len(flat) // table.num_shards)  # ceil: the busiest shard of a perfect split
    for n, e, shards, slots in reps:
        held = [load[s] for s in shards]
        least = min(range(len(shards)), key=lambda c: (held[c], c))
        mask = flat == e
        if held[least] + n <= even:
            shard[mask], slot[mask] = shards[least], slots[least]
            load[shards[least]] += n
            continue
        take = water_fill(held, n)
        copy = np.repeat(np.arange(len(shards)), take)  # [n] which copy serves each, in runs
        where = np.flatnonzero(mask)
        shard[where], slot[where] = np.array(shards)[copy], np.array(slots)[copy]
        for s, t in zip(shards, take):
            load[s] += t
    return shard, slot


def plan_dispatch(expert_ids: np.ndarray, table: CopyTable) -> list[ShardAssignments]:
    """expert_ids [T, K] (top-k per token) and the layer's copy table -> one ShardAssignments per
    shard that has any, in shard order. Every (t, k) lands in exactly one."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)  # [T*K] token-major
    shard_of, slot_of = choose_copies(flat, table)  # [T*K] each
    order = np.argsort(shard_of, kind="stable")  # grouped by shard, token-major inside each group
    counts = np.bincount(shard_of, minlength=table.num_shards)
    out, offset = [], 0
    for shard, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        slots = order[offset:offset + count]
        offset += count
        tokens = slots // k  # ascending: the distinct rows are where it changes (no sort, unlike np.unique)
        first = np.empty(count, dtype=bool)
        first[0], first[1:] = True, tokens[1:] != tokens[:-1]
        out.append(ShardAssignments(shard, tokens[first], slots, np.cumsum(first) - 1, slot_of[slots]))
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


@dataclass(frozen=True)
class DeviceCopies:
    """One layer of a placement as tensors on the router's device."""

    shard: torch.Tensor  # [E, C] the shard of each expert's copies (past an expert's count: its first again)
    slot: torch.Tensor  # [E, C] the slot there
    count: torch.Tensor  # [E] copies of each expert


def device_copies(slots: tuple[tuple[int, ...], ...], num_experts: int, device: torch.device) -> DeviceCopies:
    """slots [M][S_m] (the experts in each shard's slots) -> the layer's copies on `device`."""
    where = copies_of(slots, num_experts)
    c = max(len(w) for w in where)
    padded = [w + [w[0]] * (c - len(w)) for w in where]
    return DeviceCopies(torch.tensor([[s for s, _ in w] for w in padded], device=device),
                        torch.tensor([[i for _, i in w] for w in padded], device=device),
                        torch.tensor([len(w) for w in where], device=device))


def copies_on_device(expert_ids: torch.Tensor, copies: DeviceCopies) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_ids [T, K] -> (shard [T*K], slot [T*K]) of the copy serving each (token-major): token t's
    assignment to an expert with n copies goes to copy t mod n."""
    t, k = expert_ids.shape
    flat = expert_ids.reshape(-1)  # [T*K]
    token = torch.arange(t, device=flat.device)[:, None].expand(t, k).reshape(-1)  # [T*K]
    copy = token % copies.count[flat]
    return copies.shard[flat, copy], copies.slot[flat, copy]
