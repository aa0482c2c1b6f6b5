"""Rebalancing while serving: the one owner of a running cluster's expert placement (eplb.py).

Every `--eplb-interval` steps (or on request) it reads the router's recent per-expert counts,
computes the next placement and, when that cuts the imbalance by 5% or more, has every shard stage
it: each reads only its newly assigned slices, on another thread of its actor, while steps go on.
Once every shard has it, the next step's RouterStep carries it: the router routes by it from that
step on and the shards switch when its first request names it. Nothing waits for the reads, so no
request pauses; copies compute the same function, so no output changes. After a recovery every
actor adopts the current placement (a restarted shard reads its slices again, a staged placement is
dropped and comes again at the next interval).

All calls come from the engine's thread, except `request`, which any thread may make.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import ray
from ray.actor import ActorHandle

from cluster.balancing.eplb import ExpertPlacement, balanced_placement, predicted_imbalance

log = logging.getLogger(__name__)

ROUTER_LOAD = "router"  # a request without a load of its own: the router's window
# a new placement must cut the imbalance (by the same load) by this share, else the reads and the
# copies are not worth it: an evenly routed model would otherwise move experts at every interval
MIN_GAIN = 0.05


@dataclass
class Staging:
    placement: ExpertPlacement
    refs: list[ray.ObjectRef]  # each shard's stage call


class Rebalancer:
    def __init__(self, placement: ExpertPlacement, interval: int, router: ActorHandle,
                 shards: list[ActorHandle]) -> None:
        self.placement = placement
        self.interval = interval  # 0: only on request
        self.router, self.shards = router, shards
        self.switches = 0
        self._steps = 0
        self._load_ref: ray.ObjectRef | None = None
        self._staging: Staging | None = None
        self._demand: np.ndarray | str | None = None
        self._lock = threading.Lock()
        self.paused = False  # a resize stages its own placement (resize.py): no rebalance meanwhile

    def pause(self) -> None:
        """Until `resume`: no placement is staged or switched (a staged one is dropped; the shards'
        next stage replaces it)."""
        self.paused = True
        self._staging = self._load_ref = None

    def resume(self, placement: ExpertPlacement | None = None, shards: list[ActorHandle] | None = None) -> None:
        """After a resize: its placement and shards, when it changed them."""
        if placement is not None and shards is not None:
            self.placement, self.shards = placement, shards
        self.paused = False

    def request(self, load: np.ndarray | None = None) -> None:
        """Rebalance at the next step boundary, by `load` [L, E] or by the router's recent counts."""
        with self._lock:
            self._demand = ROUTER_LOAD if load is None else load

    def before_step(self) -> ExpertPlacement | None:
        """At the boundary before a step that routes tokens: the placement it switches to, if any."""
        self._steps += 1
        if self.paused:
            return None
        with self._lock:
            demand, self._demand = self._demand, None
        if self.interval and self._steps % self.interval == 0 and demand is None:
            demand = ROUTER_LOAD
        if demand is not None and self._staging is not None:  # one rebalance at a time: this one waits
            with self._lock:
                self._demand = self._demand if self._demand is not None else demand
            demand = None
        if isinstance(demand, np.ndarray):
            self._stage(demand)
        elif demand is not None and self._load_ref is None:
            self._load_ref = self.router.expert_load.remote()
        if self._load_ref is not None and _ready([self._load_ref]):
            ref, self._load_ref = self._load_ref, None
            try:
                self._stage(ray.get(ref).counts)
            except Exception as exc:  # the router died: the step notices and recovers; try again later
                log.warning("no expert load to rebalance by: %s", exc)
        return self._switch() if self._staging is not None and _ready(self._staging.refs) else None

    def rebalance_now(self) -> bool:
        """Stage a placement by the router's counts and wait until every shard has it; the next step
        switches. -> whether the placement changes."""
        if self.paused:
            return False
        if self._staging is not None:
            ray.get(self._staging.refs)
            return True
        self._stage(ray.get(self.router.expert_load.remote()).counts)
        if self._staging is None:
            return False
        ray.get(self._staging.refs)
        return True

    def _stage(self, load: np.ndarray) -> None:
        if not load.any():
            return
        new = balanced_placement(load, self.placement)
        now, then = predicted_imbalance(load, self.placement), predicted_imbalance(load, new)
        if new.layers == self.placement.layers or then > now * (1 - MIN_GAIN):
            log.debug("expert placement kept: imbalance %.3f, a new one would give %.3f", now, then)
            return
        log.info("rebalancing experts: placement %d, imbalance %.2f -> %.2f (by %d routed assignments)",
                 new.version, now, then, int(load.sum()))
        self._staging = Staging(new, [s.stage.remote(new) for s in self.shards])

    def _switch(self) -> ExpertPlacement | None:
        assert self._staging is not None
        staging, self._staging = self._staging, None
        try:
            ray.get(staging.refs)
        except Exception as exc:  # a shard died while reading: recovery follows; the next interval tries again
            log.warning("dropping expert placement %d: %s", staging.placement.version, exc)
            return None
        self.placement = staging.placement
        self.switches += 1
        return self.placement

    def after_recovery(self) -> None:
        """Every actor holds the current placement again (the loops are stopped)."""
        self._staging = self._load_ref = None
        ray.get([self.router.adopt.remote(self.placement)] + [s.adopt.remote(self.placement) for s in self.shards])


def _ready(refs: list[ray.ObjectRef]) -> bool:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(done) == len(refs)
