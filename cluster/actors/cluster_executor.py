"""The executor that runs the model on Ray actors.

Ray is the control plane: it places the actors (one placement group), restarts them when they die
(`max_restarts`; a restarted actor reloads its slice in __init__), and carries the rare setup calls.
Per step, the engine's own endpoint sends the step's first messages and waits for the replicas'
`StepResult`s (the sequence is written down in messages.py): one round of messages per step, none per
layer through Ray. While waiting it watches every actor's `serve` call, so a death is noticed at once,
and a step that outlives `step_timeout_s` counts as a hung actor.

Recovery stops every loop, kills what does not answer (a hung process), waits for Ray to bring dead
actors back, empties the replicas' KV caches and builds a fresh data plane (a new epoch of channels).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import resize
from cluster.actors.resize import Member
from cluster.actors.actors import REMOTE_MEMBERS
from cluster.dataplane.channels import remove_rings
from cluster.config import ClusterConfig, KVSpec, ModelSource, ReplicaSpec, RouterSpec, ShardSpec, expert_bounds
from cluster.balancing.eplb import ExpertPlacement, initial_placement
from cluster.engine.executor import Executor, ExecutorFailure, ResizeOutcome, ResizeRefused, error_line
from cluster.dataplane.messages import ActorInfo, ReplicaStep, RouterStep, StepResult
from cluster.dataplane.names import ENGINE, REPLICA_ROLE, ROUTER, ROUTER_ROLE, SHARD_ROLE, replica_name, shard_name
from cluster.actors.placement import bundle, connect_ray, release, reserve
from cluster.actors.rebalance import Rebalancer
from cluster.telemetry import ExecutorStats
from cluster.dataplane.dist_channel import GroupSpec
from model_shards.syncs import DispatchCount
from cluster.dataplane.transport import DIST_KINDS, Endpoint, PlaneSpec, StreamClosed, StreamTimeout, dist_members, plan_channels

log = logging.getLogger(__name__)

# Units (one layer of one micro-batch, every replica's rows) up to this many rows go the device's way when
# it is on (ClusterConfig.dispatch): decode steps; prefills, whose rows would reach every shard, do not.
DEVICE_DISPATCH_ROWS = 256
STOP_TIMEOUT_S = 5.0  # an actor that cannot acknowledge `stop` within this is treated as hung


class ClusterExecutor(Executor):
    router_name = ROUTER

    def __init__(self, source: ModelSource, cluster: ClusterConfig, kv: KVSpec, ray_address: str | None = None) -> None:
        self.source, self.cluster, self.kv = source, cluster, kv
        self.config = source.config()
        self.num_replicas = cluster.attention_replicas
        self.bounds, capacity = cluster.expert_layout(self.config.num_experts)
        placement = initial_placement(self.bounds, capacity, self.config.num_hidden_layers)
        self.balancing = cluster.eplb_interval > 0
        if cluster.redundant_experts and not self.balancing:
            log.warning("--redundant-experts %d without --eplb-interval: the redundant slots stay empty until a "
                        "rebalance is requested", cluster.redundant_experts)
        self._uid = uuid.uuid4().hex[:8]
        self._epoch = 0
        self.endpoint: Endpoint | None = None
        self._store = None  # the TCPStore of the torch.distributed groups, when a plane has any
        self.restarts = 0

        c = cluster
        members = [self.member(REPLICA_ROLE, i, placement) for i in range(c.attention_replicas)]
        members.append(self.member(ROUTER_ROLE, 0, placement))
        members += [self.member(SHARD_ROLE, j, placement) for j in range(len(self.bounds))]
        connect_ray(ray_address, len(members) * c.cpus_per_actor)
        self.pg = reserve([bundle(c.cpus_per_actor, m.gpus, m.resources) for m in members], c.placement_strategy,
                          c.recovery_timeout_s)
        self.actors = {
            m.name: REMOTE_MEMBERS[m.role].options(
                num_cpus=c.cpus_per_actor, num_gpus=m.gpus, resources=m.resources or None,
                max_restarts=c.max_restarts, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(m.role, m.spec, c.threads(m.role))
            for i, m in enumerate(members)
        }
        self.groups: dict[str, PlacementGroup] = {}  # actors a resize added: the group each came in
        self.pending: resize.PendingResize | None = None
        self._ended: ResizeOutcome | None = None  # a resize a recovery cancelled, not reported yet
        self.balancer = Rebalancer(placement, c.eplb_interval, self.actors[ROUTER],
                                   [self.actors[shard_name(j)] for j in range(len(self.bounds))])
        try:
            self._wait_ready(c.recovery_timeout_s)
            self._start_plane()
        except BaseException:
            self.shutdown()
            raise

    def member(self, role: str, index: int, placement: ExpertPlacement | None = None) -> Member:
        """The actor of `role` and `index`; a shard's slots come from `placement` (default: the current)."""
        c, source, kv = self.cluster, self.source, self.kv
        if role == REPLICA_ROLE:
            return Member(replica_name(index), role, ReplicaSpec(source, index, kv, c.gpus_per_attention_replica > 0),
                          c.gpus_per_attention_replica, c.attention_replica_resources)
        placement = placement or self.balancer.placement  # (the constructor passes the first placement)
        if role == ROUTER_ROLE:
            device = c.dispatch == "device" or (c.dispatch == "auto" and c.gpus_per_router > 0)
            return Member(ROUTER, role, RouterSpec(source, placement, c.eplb_window, c.gpus_per_router > 0,
                                                   kv.max_step_tokens, DEVICE_DISPATCH_ROWS if device else 0),
                          c.gpus_per_router, c.router_resources)
        bounds = expert_bounds(self.config.num_experts, len(placement.capacity)) \
            if len(placement.capacity) != len(self.bounds) else self.bounds
        return Member(shard_name(index), role, ShardSpec(source, index, bounds[index], placement.shard(index),
                                                         c.gpus_per_expert_shard > 0, kv.max_step_tokens),
                      c.gpus_per_expert_shard, c.expert_shard_resources)

    # -- setup -----------------------------------------------------------------------------------
    def _wait_ready(self, timeout_s: float) -> None:
        """Until every actor answers ping (a restarting actor answers once it has reloaded). An actor
        whose constructor raised (an unsupported CPU, no memory, a broken checkpoint) will not start on
        another try: that fails at once, with the constructor's error in one line."""
        deadline = time.monotonic() + timeout_s
        for name, actor in self.actors.items():
            while True:
                try:
                    ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                    break
                except RayActorError as exc:
                    if exc.actor_init_failed:
                        raise ExecutorFailure(f"{name} could not start: {error_line(str(exc))}") from None
                    if time.monotonic() > deadline:
                        raise ExecutorFailure(f"{name} did not come back within {timeout_s:.0f}s") from None
                    time.sleep(0.2)
                except GetTimeoutError:
                    raise ExecutorFailure(f"{name} did not come back within {timeout_s:.0f}s") from None

    def _start_plane(self) -> None:
        self._epoch += 1
        infos = ray.get([a.info.remote() for a in self.actors.values()])
        self.infos = dict(zip(self.actors, infos))
        nodes = {name: info.node for name, info in self.infos.items()}
        nodes[ENGINE] = ray.get_runtime_context().get_node_id()
        replicas = [replica_name(i) for i in range(self.num_replicas)]
        shards = [shard_name(j) for j in range(len(self.bounds))]
        pairs = [(ENGINE, ROUTER)]
        for r in replicas:
            pairs += [(ENGINE, r), (r, ENGINE), (r, ROUTER), (ROUTER, r)]
        for s in shards:
            pairs += [(ROUTER, s)] + [(s, r) for r in replicas]  # shards answer the replicas directly
        if self.cluster.transport == "shm" and len(set(nodes.values())) > 1:
            raise ExecutorFailure("transport shm needs every actor on the engine's node; use auto or tcp")
        prefix = f"gptoss-{self._uid}-{self._epoch}-"
        try:
            spec = plan_channels(prefix, pairs, nodes, self.cluster.ring_mb << 20, self.cluster.transport,
                                 self._whole_gpus())
        except ValueError as exc:
            raise ExecutorFailure(str(exc)) from None
        host = ray.util.get_node_ip_address()
        spec = self._with_groups(spec, host)
        self.endpoint = Endpoint(ENGINE, host=host)
        addresses = self.endpoint.listen(spec)
        for part in ray.get([a.listen.remote(spec) for a in self.actors.values()]):
            addresses.update(part)
        connecting = [a.connect.remote(spec, addresses) for a in self.actors.values()]
        self.endpoint.connect(spec, addresses, store=self._store)
        ray.get(connecting)
        self.serving = {name: a.serve.remote() for name, a in self.actors.items()}
        log.info("data plane epoch %d: %d channels (%s)", self._epoch, len(spec.channels),
                 ", ".join(sorted({c.kind for c in spec.channels})))

    def _whole_gpus(self) -> frozenset[str]:
        """The actors that own one or more whole GPUs (Ray gives each its own)."""
        c, names = self.cluster, set()
        if c.gpus_per_attention_replica >= 1:
            names |= {replica_name(i) for i in range(self.num_replicas)}
        if c.gpus_per_router >= 1:
            names.add(ROUTER)
        if c.gpus_per_expert_shard >= 1:
            names |= {shard_name(j) for j in range(len(self.bounds))}
        return frozenset(names)

    def _with_groups(self, spec: PlaneSpec, host: str) -> PlaneSpec:
        """The torch.distributed groups of this epoch, on a store the engine hosts (made once)."""
        groups = []
        for backend in DIST_KINDS:
            members = dist_members(spec, backend)
            if members:
                if self._store is None:
                    from torch.distributed import TCPStore

                    self._store = TCPStore(host, 0, None, is_master=True, wait_for_workers=False)
                groups.append(GroupSpec(backend, host, self._store.port, members, f"{spec.prefix}{backend}/"))
        return dataclasses.replace(spec, groups=tuple(groups))

    # -- steps -----------------------------------------------------------------------------------
    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        assert self.endpoint is not None
        timeout = self.cluster.step_timeout_s
        deadline = time.monotonic() + timeout
        try:
            steps = {r: dataclasses.replace(s, micro_batches=max(1, min(self.cluster.micro_batches, len(s.chunks))))
                     for r, s in steps.items()}
            busy = [r for r, s in sorted(steps.items()) if s.chunks]
            if busy:
                micro = [steps[r].micro_batches for r in busy]
                header = RouterStep(steps[busy[0]].step_id, busy, micro, self.balancer.before_step())
                self.endpoint.send(ROUTER, header, timeout=timeout)
            for r, step in steps.items():
                self.endpoint.send(replica_name(r), step, timeout=timeout)
            pending = {replica_name(r): r for r in steps}
            results: dict[int, StepResult] = {}
            while pending:
                ready = self.endpoint.wait_any(list(pending), timeout=0.05)
                for name in ready:
                    results[pending.pop(name)] = self.endpoint.recv(name, timeout=timeout)
                if not ready:
                    self._raise_if_down()
                    if time.monotonic() > deadline:
                        raise ExecutorFailure(f"step timed out after {timeout:.1f}s waiting for "
                                              f"{sorted(pending)}: an actor is hung")
            return results
        except (StreamClosed, StreamTimeout) as exc:
            self._raise_if_down()
            raise ExecutorFailure(f"data plane failed: {exc}") from None

    def counted(self, steps: dict[int, ReplicaStep]) -> tuple[dict[int, StepResult], dict[str, DispatchCount]]:
        ray.get([a.start_counting.remote() for a in self.actors.values()], timeout=30)
        try:
            results = self.execute(steps)
        finally:
            names = list(self.actors)
            counts = ray.get([self.actors[n].stop_counting.remote() for n in names], timeout=30)
        return results, dict(zip(names, counts))  # by data-plane name: replica0, router, shard1...

    def _raise_if_down(self) -> None:
        done, _ = ray.wait(list(self.serving.values()), num_returns=len(self.serving), timeout=0)
        for name, ref in self.serving.items():
            if ref in done:
                try:
                    reason = f"its loop ended ({ray.get(ref)})"
                except RayActorError:
                    reason = "it died"
                except Exception as exc:  # the loop raised; Ray re-raises it here with its traceback
                    reason = f"its loop failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                raise ExecutorFailure(f"{name} is down: {reason}")

    # -- recovery --------------------------------------------------------------------------------
    def stop_loops(self) -> set[str]:
        """End every actor's loop and close the plane; kill what does not answer (Ray restarts it).
        -> the actors that were dead or killed."""
        if self.endpoint is not None:
            self.endpoint.close()
        stops = {name: a.stop.remote() for name, a in self.actors.items()}
        gone: set[str] = set()  # dead, or killed here: their loops need no waiting for
        for name, ref in stops.items():
            try:
                ray.get(ref, timeout=STOP_TIMEOUT_S)
            except GetTimeoutError:
                log.warning("%s does not answer; killing it so that Ray restarts it", name)
                ray.kill(self.actors[name], no_restart=False)
                gone.add(name)
            except RayActorError:
                gone.add(name)  # dead: Ray is restarting it
        for name, ref in self.serving.items():
            if name in gone or name not in self.actors:
                continue
            try:
                ray.get(ref, timeout=STOP_TIMEOUT_S)
            except GetTimeoutError:
                log.warning("%s's loop does not end; killing it", name)
                ray.kill(self.actors[name], no_restart=False)
                gone.add(name)
            except Exception:  # its failure was already reported by execute
                pass
        return gone

    def restart_plane(self) -> None:
        """A new plane epoch over the current actor set (the loops are stopped)."""
        self._wait_ready(self.cluster.recovery_timeout_s)
        remove_rings(f"gptoss-{self._uid}-{self._epoch}-")
        self._start_plane()

    def recover(self) -> None:
        started = time.monotonic()
        if self.pending is not None:  # its staged placement would not survive the actors' adopt below
            self._ended, self.pending = resize.cancel(self, self.pending, "a recovery interrupted it"), None
        self.stop_loops()
        self._wait_ready(self.cluster.recovery_timeout_s)
        ray.get([self.actors[replica_name(i)].reset.remote() for i in range(self.num_replicas)])
        self.balancer.after_recovery()
        self.restart_plane()
        self.restarts += 1
        log.warning("cluster recovered in %.1fs (recovery %d)", time.monotonic() - started, self.restarts)

    # -- live resize (resize.py) -------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.bounds)

    def start_resize(self, replicas: int, shards: int, reason: str, timeout_s: float | None = None) -> None:
        if self.pending is not None:
            raise ResizeRefused("another resize is under way")
        self.pending = resize.begin(self, replicas, shards, reason, timeout_s or self.cluster.resize_timeout_s)

    def poll_resize(self) -> ResizeOutcome | None:
        if self._ended is not None:
            ended, self._ended = self._ended, None
            return ended
        if self.pending is None:
            return None
        pending = self.pending
        try:
            outcome = resize.advance(self, pending)
        except Exception as exc:  # the switch failed half way (an actor died): the engine recovers, on the new
            # actor set, and then the resize counts as done (reported by the next poll)
            self.pending, self._ended = None, pending.outcome()
            if isinstance(exc, ExecutorFailure):
                raise
            raise ExecutorFailure(f"the resize's switch failed: {type(exc).__name__}: {error_line(str(exc))}") from exc
        if outcome is not None:
            self.pending = None
        return outcome

    def add_actor(self, name: str, actor: ActorHandle, group: PlacementGroup | None) -> None:
        self.actors[name] = actor
        if group is not None:
            self.groups[name] = group
        # data-plane order: replicas, router, shards (by index)
        order = [replica_name(i) for i in range(len(self.actors))] + [ROUTER] + \
            [shard_name(j) for j in range(len(self.actors))]
        self.actors = {n: self.actors[n] for n in order if n in self.actors}

    def remove_actor(self, name: str) -> None:
        ray.kill(self.actors.pop(name), no_restart=True)
        self.serving.pop(name, None)
        group = self.groups.pop(name, None)
        if group is not None and group not in self.groups.values():  # its group's last actor
            release(group)

    # -- introspection ---------------------------------------------------------------------------
    def topology(self) -> list[ActorInfo]:
        """The actors of the serving plane; a shard's experts are its home range of the current split."""
        return [dataclasses.replace(info, experts=list(self.bounds[info.index])) if info.role == SHARD_ROLE else info
                for info in self.infos.values()]

    def stats(self) -> ExecutorStats:
        replicas = [replica_name(i) for i in range(self.num_replicas)]
        shards = [shard_name(j) for j in range(len(self.bounds))]
        names = [*replicas, ROUTER, *shards]
        values = ray.get([self.actors[n].stats.remote() for n in names], timeout=30)  # in `names` order
        r = len(replicas)
        return ExecutorStats(tuple(values[:r]), values[r], tuple(values[r + 1:]), self.restarts, self.balancer.switches)

    def rebalance(self) -> bool:
        return self.balancer.rebalance_now()

    def shutdown(self) -> None:
        if getattr(self, "pending", None) is not None:
            resize.cancel(self, self.pending, "the engine shut down")
            self.pending = None
        for group in set(getattr(self, "groups", {}).values()):
            release(group)
        for actor in getattr(self, "actors", {}).values():  # first: a closed endpoint would end their loops
            ray.kill(actor, no_restart=True)                # with an error that nobody reads
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if getattr(self, "pg", None) is not None:
            release(self.pg)
            self.pg = None
        remove_rings(f"gptoss-{self._uid}-")
