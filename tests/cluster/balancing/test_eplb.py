"""Expert placement (eplb.py) and the router's split of replicated experts (dispatch.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.config import expert_bounds
from cluster.balancing.dispatch import choose_copies, copy_table, plan_dispatch, water_fill
from cluster.balancing.eplb import balanced_placement, initial_placement, moved, predicted_imbalance, slot_counts


def skewed_load(layers: int, experts: int, hot: list[int], rng: np.random.Generator) -> np.ndarray:
    """[L, E]: most assignments on `hot`, a few everywhere."""
    load = rng.integers(0, 20, (layers, experts))
    load[:, hot] += 1000
    return load


def check_placement(slots_per_layer, counts: list[int], experts: int) -> None:
    for layer in slots_per_layer:
        assert [len(s) for s in layer] == counts  # a rebalance fills every slot
        assert set().union(*map(set, layer)) == set(range(experts))  # every expert has a copy
        for s in layer:
            assert len(set(s)) == len(s)  # no shard holds an expert twice


@pytest.mark.parametrize("experts,shards,redundant", [(16, 2, 2), (32, 4, 4), (32, 3, 5), (32, 4, 0), (8, 8, 8)])
def test_initial_and_balanced_placements_keep_every_expert(experts: int, shards: int, redundant: int) -> None:
    bounds = expert_bounds(experts, shards)
    counts = slot_counts(bounds, redundant, experts)
    start = initial_placement(bounds, counts, 3)
    assert sum(counts) == experts + redundant
    assert start.capacity == tuple(counts)
    assert all(layer == tuple(tuple(range(a, b)) for a, b in bounds) for layer in start.layers)  # copies come later
    rng = np.random.default_rng(experts + shards)
    new = balanced_placement(skewed_load(3, experts, [0, 1, 2, 3], rng), start)
    assert new.version == 1
    check_placement(new.layers, counts, experts)


@pytest.mark.parametrize("shards,redundant", [(2, 0), (2, 2), (4, 0), (4, 4)])
def test_a_skewed_load_is_balanced(shards: int, redundant: int) -> None:
    """The hot experts all start on shard 0 (imbalance = shards); balancing spreads them."""
    rng = np.random.default_rng(shards)
    load = skewed_load(4, 32, [1, 3, 4, 6], rng)
    bounds = expert_bounds(32, shards)
    start = initial_placement(bounds, slot_counts(bounds, redundant, 32), 4)
    assert predicted_imbalance(load, start) > 0.9 * shards
    new = balanced_placement(load, start)
    assert predicted_imbalance(load, new) <= 1.1


def test_a_rebalance_by_the_same_load_moves_nothing_and_light_experts_stay() -> None:
    rng = np.random.default_rng(0)
    load = skewed_load(2, 32, [0, 5], rng)
    bounds = expert_bounds(32, 4)
    start = initial_placement(bounds, slot_counts(bounds, 4, 32), 2)
    first = balanced_placement(load, start)
    again = balanced_placement(load, first)
    assert again.layers == first.layers
    assert all(not moved(first, again, s) for s in range(4))
    # the first rebalance moves the hot experts' copies and about as many light ones (to make room),
    # not the whole placement
    assert sum(len(moved(start, first, s)) for s in range(4)) <= 2 * 2 * 6


def test_slot_counts_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="at least 2 expert shards"):
        slot_counts(((0, 16),), 1, 16)
    with pytest.raises(ValueError, match="more than the model's 16 experts"):
        slot_counts(((0, 8), (8, 16)), 20, 16)
    with pytest.raises(ValueError, match=">= 0"):
        slot_counts(((0, 8), (8, 16)), -1, 16)


@pytest.mark.parametrize("loads,n", [([0], 5), ([5, 2], 1), ([2, 2], 3), ([3, 0, 1], 7), ([9, 9, 0], 2)])
def test_water_fill_hands_out_least_loaded_first(loads: list[int], n: int) -> None:
    take = water_fill(loads, n)
    expected = np.zeros(len(loads), dtype=np.int64)
    level = np.array(loads)
    for _ in range(n):  # one at a time: the least loaded, the lowest position on ties
        c = int(np.argmin(level))
        expected[c] += 1
        level[c] += 1
    assert take == expected.tolist()


def test_replicated_experts_split_over_their_copies_each_assignment_once() -> None:
    """Expert 0 has copies on shards 0 and 1, expert 5 on 1 and 2: their assignments are split,
    contiguous runs per copy, each served once, by the slot that holds the expert."""
    slots = ((0, 1, 2, 3), (0, 4, 5), (5, 6, 7))
    table = copy_table(slots, 8)
    rng = np.random.default_rng(1)
    ids = np.stack([rng.choice([0, 0, 0, 5, 5, 1, 6], 4, replace=False) for _ in range(40)])  # [T, K], skewed
    shard, slot = choose_copies(ids.reshape(-1), table)
    assert all(slots[s][i] == e for s, i, e in zip(shard, slot, ids.reshape(-1)))
    for e in (0, 5):
        where = shard[ids.reshape(-1) == e]
        assert len(set(where.tolist())) == 2  # both copies serve
        assert (np.diff(where) >= 0).all()  # one run per copy, in shard order of the least loaded first
    counts = np.bincount(shard, minlength=3)
    assert counts.max() - counts.min() <= 0.25 * counts.mean()
    plan = plan_dispatch(ids, table)
    assert sorted(np.concatenate([p.slots for p in plan]).tolist()) == list(range(ids.size))
    again = plan_dispatch(ids, table)  # deterministic
    assert all((p.slots == q.slots).all() and (p.expert_slots == q.expert_slots).all() for p, q in zip(plan, again))
