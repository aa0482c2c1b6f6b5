"""The router's dispatch plan: every routed assignment goes to the one shard owning its expert."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import expert_bounds
from cluster.dispatch import plan_dispatch


@pytest.mark.parametrize("tokens,experts,shards", [(1, 32, 2), (7, 16, 3), (64, 128, 5), (5, 8, 8)])
def test_every_assignment_once_on_its_owner(tokens: int, experts: int, shards: int) -> None:
    rng = np.random.default_rng(tokens)
    k = 4
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])  # [T, K]
    bounds = expert_bounds(experts, shards)
    plan = plan_dispatch(ids, np.array([a for a, _ in bounds]))
    seen = np.concatenate([p.slots for p in plan])
    assert sorted(seen.tolist()) == list(range(tokens * k))  # each (t, k) exactly once
    assert [p.shard for p in plan] == sorted({p.shard for p in plan})
    for p in plan:
        a, b = bounds[p.shard]
        assert ((p.expert_ids >= a) & (p.expert_ids < b)).all()
        assert (np.diff(p.slots) > 0).all()  # token-major order kept
        assert (np.diff(p.rows) > 0).all()  # each row sent once
        assert (p.rows[p.token_index] == p.slots // k).all()
        assert (p.expert_ids == ids.reshape(-1)[p.slots]).all()


def test_uneven_split_and_idle_shards() -> None:
    ids = np.array([[0, 1, 2, 3]])
    plan = plan_dispatch(ids, np.array([0, 2, 10]))  # shards [0,2) [2,10) [10,16)
    assert [(p.shard, p.slots.tolist(), p.rows.tolist()) for p in plan] == [(0, [0, 1], [0]), (1, [2, 3], [0])]
