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

import itertools
import logging
import threading
import time
from typing import Callable

from cluster.config import EngineConfig
from cluster.engine.events import EngineUnavailable, Event, RequestHandle, RequestTimes
from cluster.engine.executor import Executor, ExecutorFailure
from cluster.dataplane.messages import StepResult
from cluster.engine.scheduler import Finished, Schedule, Scheduler, Seq
from cluster.telemetry import EngineLoad
from model_shards.grammar import Constraint, GrammarError
from model_shards.requests import Completion, InvalidRequest, validate_request
from model_shards.sampling import SamplingParams, new_seed

log = logging.getLogger(__name__)

class Engine:
    def __init__(self, executor: Executor | Callable[[], Executor], config: EngineConfig | None = None) -> None:
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
                    while not self._stopped and not (self.scheduler.has_work or self._aborts):
                        self._lock.wait()
                    if self._stopped:
                        return
                    self._apply_aborts()
                    schedule = self.scheduler.schedule()
                if schedule.steps:
                    self._run(schedule)
        except Exception as exc:  # a bug here must not leave clients waiting forever
            log.exception("engine loop failed")
            self._fail_everything(f"engine loop failed: {exc}")

    def _apply_aborts(self) -> None:
        seqs = [self._by_request[r] for r in self._aborts if r in self._by_request]
        self._aborts.clear()
        self._report(self.scheduler.abort(seqs))

    def _run(self, schedule: Schedule) -> None:
        try:
            results = self.executor.execute(schedule.steps)
        except ExecutorFailure as exc:
            self.failures.append((time.monotonic(), str(exc)))
            log.warning("step failed: %s", exc)
            self._recover(str(exc))
            return
        self.steps += 1
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
