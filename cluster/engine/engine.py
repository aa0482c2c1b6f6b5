"""The engine: continuous batching over an executor (local or cluster).

Requests join and leave the running batch between steps; the scheduler (scheduler.py) owns every
request's state (queues, output tokens, stop checks), decides each step, and owns the KV blocks of
every replica (kv_manager.py); the engine holds the threads, the lock and the events. Tokens are
delivered per request as `Event`s (to a queue, or to a callback such as an asyncio bridge). Abort
frees the request's KV at the next step. When a step fails, on any executor, the executor is
recovered and every in-flight sequence is prefilled again from its prompt plus the tokens it already
produced; seeded, counter-based sampling makes the continuation exactly what it would have been.

n > 1 (several choices for one prompt): `submit(..., leader=handle)` makes a request wait until the
leader's prompt is in the prefix cache, then share its blocks instead of computing them again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from cluster.config import EngineConfig
from cluster.engine.events import EngineUnavailable, Event, RequestHandle, RequestTimes
from cluster.engine.autoscale import Autoscaler, Signals
from cluster.engine.executor import Executor, ExecutorFailure, ResizeOutcome, ResizeRefused
from cluster.dataplane.messages import StepResult
from cluster.engine.scheduler import Finished, Schedule, Scheduler, Seq
from cluster.telemetry import EngineLoad, shard_imbalance
from model_shards.grammar import Constraint, GrammarError
from model_shards.requests import Completion, InvalidRequest, validate_request
from model_shards.sampling import SamplingParams, new_seed

log = logging.getLogger(__name__)

RESIZE_POLL_S = 0.05  # while a resize is pending and nothing runs, how often the loop looks at it
AUTOSCALE_POLL_S = 0.25  # with --autoscale and nothing running, how often the loop reads its signals
RECENT_STEPS = 32  # steps whose shard compute share the autoscaler reads
IMBALANCE_EVERY_S = 5.0  # how often the autoscaler reads the shards' routed load (one call per actor)


@dataclass
class ScaleRequest:
    """A resize asked for (by hand or by the autoscaler), answered when the new plane serves."""

    replicas: int | None  # None: keep the count
    shards: int | None
    reason: str
    timeout_s: float | None = None  # None: --resize-timeout
    done: Future[ResizeOutcome] = field(default_factory=Future)


class Engine:
    def __init__(self, executor: Executor | Callable[[], Executor], config: EngineConfig | None = None,
                 autoscaler: Autoscaler | None = None) -> None:
        """`executor`, or a function that builds one: then it is built in the engine's own thread, which
        runs every step. With OpenMP, torch work in a second thread after the first one has run any is
        slow (two thread teams contend for the cores: docs/measurements.md), so a local engine loads
        its model in the thread that will compute with it."""
        self._started = threading.Event()
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.executor: Executor = executor if isinstance(executor, Executor) else None  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._run_thread, args=(executor,), name="gptoss-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        executor = self.executor
        self.config = config = config or EngineConfig()
        self.model_config = executor.config
        self.kv = executor.kv
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings, self.kv.tokens)
        self.scheduler = Scheduler(config, self.kv, executor.num_replicas, self.model_config.sliding_window)
        self._lock = threading.Condition()
        self._aborts: set[str] = set()
        self._by_request: dict[str, Seq] = {}
        self._ids = itertools.count()
        self.steps = 0  # steps executed (tests count them to see batching)
        self.failures: list[tuple[float, str]] = []  # (monotonic time noticed, reason) per executor failure
        self.healthy = True
        self.last_error: str | None = None
        self._stopped = False
        self._draining = False
        self.autoscaler = autoscaler
        self.resizes: list[ResizeOutcome] = []  # every resize that ended, in order (metrics, tests)
        self._scale_requests: collections.deque[ScaleRequest] = collections.deque()
        self._resizing: ScaleRequest | None = None
        # (shard compute s, step s) of the recent steps: the autoscaler's shard signal
        self._recent: collections.deque[tuple[float, float]] = collections.deque(maxlen=RECENT_STEPS)
        self._imbalance: tuple[float, float | None] = (-IMBALANCE_EVERY_S, None)  # (read at, busiest over mean)
        self._started.set()

    def _run_thread(self, executor: Executor | Callable[[], Executor]) -> None:
        try:
            if not isinstance(executor, Executor):
                self.executor = executor()
            self.executor.enter_thread()
        except BaseException as exc:  # reported by __init__, in the caller's thread
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._started.wait()
        self._loop()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               sink: Callable[[Event], None] | None = None, leader: str | None = None) -> RequestHandle:
        """Queue a request. `leader`: the id of a request with the same prompt submitted just before
        (another choice of the same prompt); this one is admitted once the leader's prompt is cached,
        to share it."""
        validate_request(prompt_ids, params, self.model_config, self.max_model_len)
        constraint = None
        if params.grammar is not None:  # compiled here, outside the lock
            try:
                constraint = Constraint(params.grammar)
            except GrammarError as exc:
                raise InvalidRequest(f"the structured-output grammar does not compile: {exc}", "grammar") from None
        with self._lock:
            if self._draining or self._stopped:
                raise EngineUnavailable("the server is shutting down")
            if not self.healthy:
                raise EngineUnavailable(self.last_error or "the engine is not healthy")
            seq_id = next(self._ids)
            request_id = request_id or f"req-{seq_id}"
            if request_id in self._by_request:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            handle = RequestHandle(request_id, list(prompt_ids), sink)
            seed = params.seed if params.seed is not None else new_seed()
            lead = self._by_request.get(leader) if leader is not None else None
            seq = Seq(seq_id, handle, list(prompt_ids), params, seed, RequestTimes(time.monotonic()), leader=lead,
                      constraint=constraint)
            self.scheduler.add(seq)  # raises EngineOverloaded when too many wait already
            self._by_request[request_id] = seq
            self._lock.notify()
        return handle

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._by_request:
                self._aborts.add(request_id)
                self._lock.notify()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
                 timeout: float | None = None) -> list[Completion]:
        """Submit every prompt at once and wait for all (the CLI's path)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        return [h.result(timeout) for h in handles]

    def scale(self, attention_replicas: int | None = None, expert_shards: int | None = None, reason: str = "manual",
              timeout_s: float | None = None) -> Future[ResizeOutcome]:
        """Resize at a step boundary (resize.py), from any thread: the future is answered with the
        outcome once the new plane serves, or once the resize failed and the old plane serves on (then
        `outcome.error` says why); it raises ResizeRefused for counts that cannot work."""
        request = ScaleRequest(attention_replicas, expert_shards, reason, timeout_s)
        with self._lock:
            if self._stopped or self._draining:
                raise ResizeRefused("the server is shutting down")
            self._scale_requests.append(request)
            self._lock.notify()
        return request.done

    def counts(self) -> tuple[int, int]:
        """(attention replicas, expert shards) of the serving plane."""
        return self.executor.num_replicas, self.executor.num_shards

    def load(self) -> EngineLoad:
        with self._lock:
            s = self.scheduler
            return EngineLoad(s.num_running, s.num_waiting, s.kv_usage(), self.steps, s.prefix_queries,
                              s.prefix_hits, s.kv_cached_share())

    def begin_drain(self) -> int:
        """Refuse new requests from now on; returns how many are still in flight."""
        with self._lock:
            self._draining = True
        return self.in_flight()

    def in_flight(self) -> int:
        with self._lock:
            return self.scheduler.num_unfinished

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new requests, let in-flight ones finish for up to `drain_timeout_s`, end the
        rest with finish_reason "abort", then release the executor."""
        self.begin_drain()
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self.in_flight():
            time.sleep(0.02)
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=30)
        with self._lock:
            self._report(self.scheduler.drain("abort", "the server shut down before the request finished"))
        self.executor.shutdown()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._stopped and not (self.scheduler.has_work or self._aborts or self._scale_requests):
                        self._lock.wait(self._idle_wait())
                    if self._stopped:
                        self._end_scaling("the engine shut down")
                        return
                    self._apply_aborts()
                self._scale_step()
                with self._lock:
                    schedule = self.scheduler.schedule() if self.scheduler.has_work else None
                if schedule is not None and schedule.steps:
                    self._run(schedule)
        except Exception as exc:  # a bug here must not leave clients waiting forever
            log.exception("engine loop failed")
            self._fail_everything(f"engine loop failed: {exc}")
            self._end_scaling(f"engine loop failed: {exc}")

    def _idle_wait(self) -> float | None:
        """How long the loop may sleep with nothing to run: until notified, unless a resize or the
        autoscaler needs looking at."""
        if self._resizing is not None:
            return RESIZE_POLL_S
        return AUTOSCALE_POLL_S if self.autoscaler is not None else None

    # -- resizing (at step boundaries, on this thread) ---------------------------------------------
    def _scale_step(self) -> None:
        if self._resizing is None:
            with self._lock:
                request = self._scale_requests.popleft() if self._scale_requests else None
            if request is None and self.autoscaler is not None:
                request = self._autoscale()
            if request is not None:
                self._start_resize(request)
        if self._resizing is not None:
            try:
                outcome = self.executor.poll_resize()
            except ExecutorFailure as exc:  # the switch failed half way: recover on the new actor set
                outcome = None
                self._sync_replicas()
                self.failures.append((time.monotonic(), str(exc)))
                self._recover(str(exc))
            if outcome is not None:
                self._resized(outcome)

    def _start_resize(self, request: ScaleRequest) -> None:
        replicas, shards = self.counts()
        target = (replicas if request.replicas is None else request.replicas,
                  shards if request.shards is None else request.shards)
        if target == (replicas, shards):
            request.done.set_result(ResizeOutcome(request.reason, (replicas,) * 2, (shards,) * 2, 0.0))
            return
        try:
            self.executor.start_resize(*target, request.reason, request.timeout_s)
        except ResizeRefused as exc:
            request.done.set_exception(exc)
            return
        self._resizing = request

    def _resized(self, outcome: ResizeOutcome) -> None:
        request, self._resizing = self._resizing, None
        moved = self._sync_replicas()
        if outcome.ok:
            log.info("resized (%s) in %.1fs: attention replicas %d -> %d, expert shards %d -> %d; %d sequences "
                     "moved", outcome.reason, outcome.seconds, *outcome.replicas, *outcome.shards, moved)
        self.resizes.append(outcome)
        self._recent.clear()  # the new plane's timings start over
        if self.autoscaler is not None:
            self.autoscaler.resized()
        if request is not None:
            request.done.set_result(outcome)

    def _sync_replicas(self) -> int:
        """The scheduler's replica count follows the executor's (resize.py). -> sequences moved."""
        with self._lock:
            if len(self.scheduler.replicas) == self.executor.num_replicas:
                return 0
            moved = self.scheduler.resize(self.executor.num_replicas)
            self._lock.notify()
            return moved

    def _autoscale(self) -> ScaleRequest | None:
        assert self.autoscaler is not None
        replicas, shards = self.counts()
        with self._lock:
            kv, waiting = self.scheduler.kv_usage(), self.scheduler.num_waiting
        busy = sum(step for _, step in self._recent)
        share = sum(shard for shard, _ in self._recent) / busy if busy > 0 else None
        decision = self.autoscaler.observe(Signals(time.monotonic(), replicas, shards, kv, waiting, share,
                                                   self._recent_imbalance(shards)))
        if decision is None:
            return None
        log.info("%s: asking for %d attention replicas and %d expert shards (KV usage %.2f, %d waiting)",
                 decision.reason, decision.replicas, decision.shards, kv, waiting)
        return ScaleRequest(decision.replicas, decision.shards, decision.reason)

    def _recent_imbalance(self, shards: int) -> float | None:
        """The shards' recent routed imbalance (the router's window), read every few seconds and only
        where it can matter: more than one shard, and a policy that may remove one."""
        assert self.autoscaler is not None
        read_at, value = self._imbalance
        if shards < 2 or shards <= self.autoscaler.policy.min_shards:
            return None
        if time.monotonic() - read_at >= IMBALANCE_EVERY_S:
            try:
                recent = self.executor.stats().router.recent_shard_tokens
                value = shard_imbalance(recent)[1] if recent else None
            except Exception as exc:  # an actor restarting: the next step notices; keep the last reading
                log.warning("no shard load for the autoscaler: %s", exc)
            self._imbalance = (time.monotonic(), value)
        return value

    def _end_scaling(self, why: str) -> None:
        """Answer every resize request still open (shutdown, or a broken loop)."""
        for request in [*self._scale_requests, *([self._resizing] if self._resizing else [])]:
            if not request.done.done():
                request.done.set_exception(ResizeRefused(why))
        self._scale_requests.clear()
        self._resizing = None

    def _apply_aborts(self) -> None:
        seqs = [self._by_request[r] for r in self._aborts if r in self._by_request]
        self._aborts.clear()
        self._report(self.scheduler.abort(seqs))

    def _run(self, schedule: Schedule) -> None:
        started = time.perf_counter()
        try:
            results = self.executor.execute(schedule.steps)
        except ExecutorFailure as exc:
            self.failures.append((time.monotonic(), str(exc)))
            log.warning("step failed: %s", exc)
            self._recover(str(exc))
            return
        self.steps += 1
        self._recent.append((max(r.shard_s for r in results.values()), time.perf_counter() - started))
        with self._lock:
            self._apply(results, schedule)

    def _apply(self, results: dict[int, StepResult], schedule: Schedule) -> None:
        for out in self.scheduler.update_from_output(schedule, results):
            got = out.sampled
            out.seq.handle.emit(Event(out.seq.handle.request_id, got.token, got.logprob, got.top))
            if out.finished is not None:
                self._report([out.finished])

    def _report(self, finished: list[Finished]) -> None:
        """Send the final event of sequences the scheduler ended (caller holds the lock)."""
        for done in finished:
            seq = done.seq
            self._by_request.pop(seq.handle.request_id, None)
            seq.handle.emit(Event(seq.handle.request_id, finish_reason=done.reason, error=done.error,
                                  times=seq.times, cached_tokens=seq.hit, replica=done.replica))

    def _recover(self, reason: str) -> None:
        try:
            self.executor.recover()
        except Exception as exc:
            log.exception("recovery failed")
            self._fail_everything(f"the cluster could not recover from '{reason}': {exc}")
            return
        with self._lock:
            self._report(self.scheduler.recover(reason))

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            self.healthy = False
            self.last_error = message
            self._report(self.scheduler.drain("error", message))
