"""Expert-parallel load balancing: where each layer's experts live (the placement), and how a new
placement is computed from observed loads. Pure functions; the executor owns the placement (it
computes one, has the shards load it and switches the router to it at a step boundary: rebalance.py),
the router and the shards only store what they are given.

Every shard has a fixed number of expert slots per layer: its share of the experts (the even split or
--expert-split) plus its share of the R redundant slots (--redundant-experts), empty until the first
rebalance fills them. Every expert has at least one copy and no shard holds two copies of one expert. Copies compute the same function and the
replica combines in (token, k) order, so which copy serves an assignment never changes the output.

A new placement is DeepSeek's EPLB greedy, per layer: the R redundant slots go one at a time to the
expert with the highest load per copy, then the copies, heaviest first, go to the least-loaded shard
that has a free slot and does not hold that expert yet. Light copies (under a quarter of the mean load
per slot) prefer the shard that already holds them, so that a rebalance moves the experts that matter
and little else: each moved expert is a read from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Slots = tuple[tuple[int, ...], ...]  # [M][S_m] the expert in each slot of each shard, one layer


@dataclass(frozen=True)
class ExpertPlacement:
    version: int  # 0 at start; every switch adds one
    layers: tuple[Slots, ...]  # [L][M][S_m], S_m <= capacity[m]
    capacity: tuple[int, ...]  # [M] slots of each shard per layer

    def shard(self, index: int) -> tuple[tuple[int, ...], ...]:
        """[L][S] the experts in shard `index`'s slots, per layer."""
        return tuple(layer[index] for layer in self.layers)


def slot_counts(bounds: tuple[tuple[int, int], ...], redundant: int, num_experts: int) -> list[int]:
    """Slots per shard: its experts [a, b) plus its share of the redundant ones (the first shards take
    one more when R does not divide evenly)."""
    m = len(bounds)
    if redundant < 0:
        raise ValueError(f"redundant experts must be >= 0, not {redundant}")
    if redundant and m < 2:
        raise ValueError("redundant experts need at least 2 expert shards (copies on one shard balance nothing)")
    counts = [b - a + redundant // m + (i < redundant % m) for i, (a, b) in enumerate(bounds)]
    if max(counts) > num_experts:
        raise ValueError(f"{redundant} redundant experts over {m} shards gives a shard {max(counts)} slots, more "
                         f"than the model's {num_experts} experts")
    return counts


def initial_placement(bounds: tuple[tuple[int, int], ...], capacity: list[int], num_layers: int) -> ExpertPlacement:
    """Version 0, before any load is known: shard m holds [a, b) of its `capacity[m]` slots
    (slot_counts); the redundant slots stay empty (no memory, no reads) until the first rebalance
    knows which experts deserve copies."""
    return ExpertPlacement(0, (tuple(tuple(range(a, b)) for a, b in bounds),) * num_layers, tuple(capacity))


def copies_per_expert(load: np.ndarray, total_slots: int, max_copies: int) -> np.ndarray:
    """load [E] -> copies [E]: one each, then every extra slot to the highest load per copy (lowest id on
    ties), never more than `max_copies` (the number of shards)."""
    copies = np.ones(len(load), dtype=np.int64)
    for _ in range(total_slots - len(load)):
        per_copy = np.where(copies < max_copies, load / copies, -1.0)
        e = int(np.argmax(per_copy))  # the first maximum: the lowest id
        if per_copy[e] < 0:
            break
        copies[e] += 1
    return copies


def balance_layer(load: np.ndarray, current: Slots, capacity: tuple[int, ...]) -> Slots:
    """load [E] (routed assignments per expert) and the layer's current slots -> new slots, every
    slot of every shard filled (`capacity` [M])."""
    m, total = len(capacity), sum(capacity)
    load = load.astype(np.float64)
    copies = copies_per_expert(load, total, m)
    items = sorted(((load[e] / copies[e], e) for e in range(len(load)) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))  # heaviest copy first
    light = 0.25 * load.sum() / total
    before = [set(s) for s in current]
    held: list[set[int]] = [set() for _ in range(m)]
    shard_load = [0.0] * m
    for per_copy, e in items:
        room = [s for s in range(m) if len(held[s]) < capacity[s]]
        fits = [s for s in room if e not in held[s]]
        if not fits:  # every shard with room holds e already: fill it with an expert it lacks instead
            s = min(room, key=lambda s: (shard_load[s], s))
            e = max((x for x in range(len(load)) if x not in held[s]), key=lambda x: (load[x] / copies[x], -x))
            held[s].add(e)
            continue
        if per_copy <= light:
            s = min(fits, key=lambda s: (e not in before[s], shard_load[s], s))
        else:
            s = min(fits, key=lambda s: (shard_load[s], e not in before[s], s))
        held[s].add(e)
        shard_load[s] += per_copy
    return tuple(tuple(sorted(h)) for h in held)


def balanced_placement(load: np.ndarray, current: ExpertPlacement) -> ExpertPlacement:
    """load [L, E] -> the next placement (version + 1), layer by layer."""
    return ExpertPlacement(current.version + 1, tuple(balance_layer(load[i], slots, current.capacity)
                                                      for i, slots in enumerate(current.layers)), current.capacity)


def moved(old: ExpertPlacement, new: ExpertPlacement, shard: int) -> list[tuple[int, int]]:
    """(layer, expert) pairs shard `shard` holds in `new` and not in `old`: what it has to read."""
    return [(i, e) for i, (a, b) in enumerate(zip(old.shard(shard), new.shard(shard))) for e in b if e not in a]


def predicted_imbalance(load: np.ndarray, placement: ExpertPlacement) -> float:
    """The busiest shard's load over the mean, summed over layers, if each expert's load were split
    evenly over its copies (what the router's least-loaded split approaches)."""
    busiest = mean = 0.0
    for layer_load, slots in zip(load, placement.layers):
        copies = np.zeros(len(layer_load))
        for s in slots:
            copies[list(s)] += 1
        per_copy = layer_load / copies
        shard_loads = [float(per_copy[list(s)].sum()) for s in slots]
        busiest, mean = busiest + max(shard_loads), mean + sum(shard_loads) / len(shard_loads)
    return busiest / mean if mean else 1.0
