"""The router's dispatch plan: every routed assignment goes to the one shard owning its expert."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import expert_bounds
from cluster.balancing.dispatch import owners, plan_dispatch, range_table, replica_shares


@pytest.mark.parametrize("tokens,experts,shards", [(1, 32, 2), (7, 16, 3), (64, 128, 5), (5, 8, 8)])
def test_every_assignment_once_on_its_owner(tokens: int, experts: int, shards: int) -> None:
    rng = np.random.default_rng(tokens)
    k = 4
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])  # [T, K]
    bounds = expert_bounds(experts, shards)
    plan = plan_dispatch(ids, range_table(np.array([a for a, _ in bounds]), experts))
    seen = np.concatenate([p.slots for p in plan])
    assert sorted(seen.tolist()) == list(range(tokens * k))  # each (t, k) exactly once
    assert [p.shard for p in plan] == sorted({p.shard for p in plan})
    for p in plan:
        a, b = bounds[p.shard]
        assert ((p.expert_slots >= 0) & (p.expert_slots < b - a)).all()
        assert (np.diff(p.slots) > 0).all()  # token-major order kept
        assert (np.diff(p.rows) > 0).all()  # each row sent once
        assert (p.rows[p.token_index] == p.slots // k).all()
        assert (p.expert_slots + a == ids.reshape(-1)[p.slots]).all()


def test_uneven_split_and_idle_shards() -> None:
    ids = np.array([[0, 1, 2, 3]])
    plan = plan_dispatch(ids, range_table(np.array([0, 2, 10]), 16))  # shards [0,2) [2,10) [10,16)
    assert [(p.shard, p.slots.tolist(), p.rows.tolist()) for p in plan] == [(0, [0, 1], [0]), (1, [2, 3], [0])]


@pytest.mark.parametrize("sizes,experts,shards", [([1], 32, 2), ([3, 1, 5], 16, 3), ([0, 4], 8, 4), ([7, 9], 128, 5)])
def test_each_replica_gets_every_answer_of_its_rows_once(sizes: list[int], experts: int, shards: int) -> None:
    """Three hops: the shards answer the replicas; the pieces a replica gets fill its [T_r * K] slots
    exactly, and the parts a shard sends are the runs of its assignments, in replica order."""
    rng = np.random.default_rng(sum(sizes))
    k = 4
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(sum(sizes))])  # [T, K]
    plan = plan_dispatch(ids, range_table(np.array([a for a, _ in expert_bounds(experts, shards)]), experts))
    per_shard = owners(plan, sizes, k)
    assert [int(c.sum()) for c in per_shard] == [len(a.slots) for a in plan]
    shares = replica_shares(plan, per_shard, sizes, k)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])) * k
    for share, size, start in zip(shares, sizes, starts):
        assert sorted(share.slots.tolist()) == list(range(size * k))  # every (t, k) of the replica, once
        assert (np.diff(share.shards) > 0).all() and int(share.counts.sum()) == size * k
        offset = 0
        for shard, count in zip(share.shards.tolist(), share.counts.tolist()):
            a = next(p for p in plan if p.shard == shard)
            global_slots = share.slots[offset:offset + count] + start
            run = int(per_shard[plan.index(a)][:share.replica].sum())
            assert (a.slots[run:run + count] == global_slots).all()  # the shard's run for this replica
            offset += count


def test_copies_on_device_serve_every_assignment_from_a_copy_of_its_expert() -> None:
    """The device's dispatch: each (token, k) goes to a shard and slot that hold its expert; a
    replicated expert's tokens alternate over its copies; experts with one copy never move."""
    import torch

    from cluster.balancing.dispatch import copies_on_device, device_copies

    slots = ((0, 1, 2, 3, 7), (4, 5, 6, 7, 0))  # experts 0 and 7 on both shards
    copies = device_copies(slots, 8, torch.device("cpu"))
    ids = torch.tensor([[0, 7], [0, 3], [7, 4], [0, 5]])  # [T=4, K=2]
    shard, slot = copies_on_device(ids, copies)
    for (t, k), s, i in zip([(t, k) for t in range(4) for k in range(2)], shard.tolist(), slot.tolist()):
        assert slots[s][i] == int(ids[t, k])
    assert shard.view(4, 2)[:, 0].tolist() == [0, 1, 0, 1]  # experts 0, 0, 7, 0 (both shards): copy t mod 2
    assert shard.view(4, 2)[1, 1].item() == 0 and shard.view(4, 2)[2, 1].item() == 1  # experts 3, 4: their one shard
