"""Live resize: a running cluster changes its number of attention replicas and expert shards without
dropping a request (docs/scaling.md).

A resize has two halves. While the old plane serves, the new actors are placed in a placement group
of their own (so that Ray's autoscaler, or KubeRay's, can add the machines they ask for) and load
their weights; when the expert shard count changes, the surviving shards stage their part of the new
placement in the background (reading only the slices they gain, as a rebalance does: rebalance.py),
and the new shards load theirs. Nothing waits for any of that: the engine polls at every step
boundary. Once everything is ready, at the next boundary the executor stops the loops, kills the
removed actors (the highest indices), hands the router the new placement and starts a new plane
epoch. The engine then tells the scheduler the replica count: sequences of removed replicas are
prefilled again on the remaining ones (scheduler.resize), the others keep their KV.

Re-prefill rather than KV transfer: the replicas hold no more than a few thousand tokens of KV each
here, and a prefill of them costs one step, while a transfer would need a new data-plane message and
a block-table rewrite on both sides. Seeded, counter-based sampling makes the continuation exact.

A resize that cannot be placed (resources that never arrive) or whose actors fail to load gives up at
its timeout: the new actors are killed, their group released, and the old plane never stopped serving.
A recovery (a failed step) while a resize is pending cancels it the same way.

Everything here runs on the engine's thread (the executor's caller).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors.actors import REMOTE_MEMBERS
from cluster.actors.placement import bundle, release
from cluster.actors.rebalance import Rebalancer
from cluster.actors.roles import Spec
from cluster.balancing.eplb import ExpertPlacement, initial_placement, slot_counts
from cluster.config import ClusterConfig, expert_bounds
from cluster.dataplane.names import REPLICA_ROLE, SHARD_ROLE, replica_name, shard_name
from cluster.engine.executor import ResizeOutcome, ResizeRefused, error_line
from model_shards.config import GptOssConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """An actor to create: what it is told, and what it asks Ray for."""

    name: str  # its data-plane name (names.py)
    role: str
    spec: Spec
    gpus: float
    resources: dict[str, float]  # custom Ray resources (ClusterConfig.*_resources)


class ClusterExecutor(Protocol):
    """What a resize needs of the executor (cluster_executor.py), which calls it."""

    config: GptOssConfig
    cluster: ClusterConfig
    bounds: tuple[tuple[int, int], ...]  # each shard's home range
    num_replicas: int
    actors: dict[str, ActorHandle]  # by data-plane name
    balancer: Rebalancer
    router_name: str

    def member(self, role: str, index: int, placement: ExpertPlacement | None = None) -> Member: ...

    def stop_loops(self) -> set[str]: ...

    def remove_actor(self, name: str) -> None: ...

    def add_actor(self, name: str, actor: ActorHandle, group: PlacementGroup | None) -> None: ...

    def restart_plane(self) -> None: ...


@dataclass
class PendingResize:
    """A resize between its start and its switch (or its failure)."""

    reason: str
    started: float  # monotonic
    deadline: float  # monotonic: give up after this
    replicas: tuple[int, int]  # before, after
    shards: tuple[int, int]
    placement: ExpertPlacement | None  # the new expert placement, when the shard count changes
    bounds: tuple[tuple[int, int], ...]  # the shards' home ranges after the switch
    members: list[Member]  # the actors to add
    pg: PlacementGroup | None = None  # their own placement group (None when nothing is added)
    pg_ready: ray.ObjectRef | None = None  # asked once: each pg.ready() call starts a task
    actors: dict[str, ActorHandle] = field(default_factory=dict)  # created once the group is placed
    refs: list[ray.ObjectRef] = field(default_factory=list)  # what must finish before the switch

    def outcome(self, error: str | None = None) -> ResizeOutcome:
        seconds = time.monotonic() - self.started
        if error is None:
            return ResizeOutcome(self.reason, self.replicas, self.shards, seconds)
        return ResizeOutcome(self.reason, (self.replicas[0],) * 2, (self.shards[0],) * 2, seconds, error)


def begin(ex: ClusterExecutor, replicas: int, shards: int, reason: str, timeout_s: float) -> PendingResize:
    """Ask Ray for the new actors' resources and have the surviving shards stage the new placement.
    Raises ResizeRefused for counts that cannot work."""
    num_experts = ex.config.num_experts
    if replicas < 1:
        raise ResizeRefused(f"attention replicas must be at least 1, not {replicas}")
    if not 1 <= shards <= num_experts:
        raise ResizeRefused(f"expert shards must be between 1 and the model's {num_experts} experts, not {shards}")
    old_shards = len(ex.bounds)
    placement, bounds = None, ex.bounds
    if shards != old_shards:  # an even split of the new count (an explicit --expert-split fits one count only)
        bounds = expert_bounds(num_experts, shards)
        try:
            capacity = slot_counts(bounds, ex.cluster.redundant_experts, num_experts)
        except ValueError as exc:
            raise ResizeRefused(str(exc)) from None
        start = initial_placement(bounds, capacity, ex.config.num_hidden_layers)
        # redundant slots start empty again; the next rebalance fills them by the routed load
        placement = ExpertPlacement(ex.balancer.placement.version + 1, start.layers, start.capacity)
    now = time.monotonic()
    p = PendingResize(reason, now, now + timeout_s, (ex.num_replicas, replicas), (old_shards, shards), placement,
                      bounds, [])
    p.members = [ex.member(REPLICA_ROLE, i, placement) for i in range(ex.num_replicas, replicas)]
    p.members += [ex.member(SHARD_ROLE, j, placement) for j in range(old_shards, shards)]
    if placement is not None:
        ex.balancer.pause()  # no rebalance may switch placements under this one
        survivors = [ex.actors[shard_name(j)] for j in range(min(old_shards, shards))]
        p.refs += [s.stage.remote(placement) for s in survivors]  # on another thread of each: steps go on
    if p.members:
        c = ex.cluster
        p.pg = placement_group([bundle(c.cpus_per_actor, m.gpus, m.resources) for m in p.members],
                               strategy=c.placement_strategy)
        p.pg_ready = p.pg.ready()
    log.info("resize (%s): attention replicas %d -> %d, expert shards %d -> %d; placing %d new actors",
             reason, *p.replicas, *p.shards, len(p.members))
    return p


def advance(ex: ClusterExecutor, p: PendingResize) -> ResizeOutcome | None:
    """At a step boundary: place the actors once their group is ready, switch once everything is
    loaded, give up at the deadline. -> the outcome once the resize ended."""
    if time.monotonic() > p.deadline:
        what = "its actors' resources did not arrive" if p.members and not p.actors else "its actors did not load"
        return cancel(ex, p, f"timed out after {p.deadline - p.started:.0f}s: {what}")
    if p.pg_ready is not None and not p.actors:
        if not _ready([p.pg_ready]):
            return None
        c = ex.cluster
        for i, m in enumerate(p.members):
            strategy = PlacementGroupSchedulingStrategy(p.pg, placement_group_bundle_index=i)
            p.actors[m.name] = REMOTE_MEMBERS[m.role].options(
                num_cpus=c.cpus_per_actor, num_gpus=m.gpus, resources=m.resources or None, max_restarts=c.max_restarts,
                max_task_retries=0, scheduling_strategy=strategy,
            ).remote(m.role, m.spec, c.threads(m.role))
        for m in p.members:
            actor = p.actors[m.name]
            # a new shard loaded its slots of the new placement; adopting it only names the version
            p.refs.append(actor.adopt.remote(p.placement) if m.role == SHARD_ROLE else actor.ping.remote())
    if not _ready(p.refs):
        return None
    try:
        ray.get(p.refs)
    except RayActorError as exc:
        if exc.actor_init_failed:
            return cancel(ex, p, f"a new actor could not start: {error_line(str(exc))}")
        return cancel(ex, p, f"an actor died before the switch: {error_line(str(exc))}")  # a survivor: recovery follows
    except Exception as exc:  # a stage call raised (a survivor could not read its slices)
        return cancel(ex, p, f"staging the new placement failed: {error_line(str(exc))}")
    switch(ex, p)
    outcome = p.outcome()
    log.info("resize (%s) done in %.1fs: attention replicas %d, expert shards %d", p.reason, outcome.seconds,
             p.replicas[1], p.shards[1])
    return outcome


def switch(ex: ClusterExecutor, p: PendingResize) -> None:
    """Between two steps: the new actor set serves from the next step on. Raises ExecutorFailure when
    the new plane cannot start (the engine then recovers, on the new actor set)."""
    ex.stop_loops()
    keep = {replica_name(i) for i in range(p.replicas[1])} | {shard_name(j) for j in range(p.shards[1])}
    for name in [n for n in ex.actors if n not in keep and n != ex.router_name]:
        ex.remove_actor(name)
    for name, actor in p.actors.items():
        ex.add_actor(name, actor, p.pg)
    ex.num_replicas = p.replicas[1]
    if p.placement is not None:
        ex.bounds = p.bounds
        # the balancer first: should the router's adopt fail, the recovery adopts this placement everywhere
        ex.balancer.resume(p.placement, [ex.actors[shard_name(j)] for j in range(p.shards[1])])
        ray.get(ex.actors[ex.router_name].adopt.remote(p.placement))
    ex.restart_plane()


def cancel(ex: ClusterExecutor, p: PendingResize, why: str) -> ResizeOutcome:
    """Give up: the new actors go, their resources are released, the old plane serves on."""
    for actor in p.actors.values():
        ray.kill(actor, no_restart=True)
    if p.pg is not None:
        release(p.pg)
    if p.placement is not None:
        ex.balancer.resume()  # survivors keep a staged placement nobody names; the next stage replaces it
    outcome = p.outcome(why)
    log.warning("resize (%s) to %d attention replicas and %d expert shards failed after %.1fs, serving on "
                "the old plane: %s", p.reason, p.replicas[1], p.shards[1], outcome.seconds, why)
    return outcome


def _ready(refs: list[ray.ObjectRef]) -> bool:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(done) == len(refs)
