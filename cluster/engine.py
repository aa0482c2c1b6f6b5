"""The engine: continuous batching over an executor (local or cluster).

Requests join and leave the running batch between steps. Each step the scheduler gives every
running sequence in decode one token, then fills the rest of the token budget with prefill chunks
(in arrival order), and admits waiting requests while some attention replica has a free sequence
slot and KV room for the request's whole lifetime (prompt + max_tokens): reserving up front means a
running sequence never has to be preempted. Sequences go to the replica with the most free KV.

Tokens are delivered per request as `Event`s (to a queue, or to a callback such as an asyncio
bridge). Abort frees the request's KV at the next step. When the executor fails, it is recovered and
every in-flight sequence is prefilled again from its prompt plus the tokens it already produced;
seeded, counter-based sampling makes the continuation exactly what it would have been.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cluster.config import EngineConfig
from cluster.executor import Executor, ExecutorFailure
from cluster.messages import ChunkPlan, ReplicaStep, StepResult
from cluster.telemetry import EngineLoad
from model_shards.requests import Completion, InvalidRequest, validate_request
from model_shards.sampling import SamplingParams, new_seed

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineUnavailable(RuntimeError):
    """The engine cannot run requests (it failed to recover, or is shut down)."""


@dataclass
class RequestTimes:
    arrival: float
    scheduled: float | None = None  # first step that ran any of its tokens
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class Event:
    request_id: str
    token: int | None = None  # a generated token, or None on the final event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error, on the last event
    error: str | None = None
    times: RequestTimes | None = None  # on the last event: when it arrived, was scheduled, produced tokens


class RequestHandle:
    """What submit() returns: the request's events, in order, ending with a finish event."""

    def __init__(self, request_id: str, prompt_ids: list[int], sink: Callable[[Event], None] | None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.events: queue.Queue[Event] = queue.Queue()
        self._sink = sink or self.events.put

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except Exception as exc:  # the consumer is gone (its event loop closed...): never the engine's problem
            log.warning("dropped an event for %s: %s", self.request_id, exc)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends (only for handles without a custom sink)."""
        tokens, logprobs = [], []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            if event.token is not None:
                tokens.append(event.token)
                logprobs.append(event.logprob)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise EngineUnavailable(event.error or "request failed")
                return Completion(self.prompt_ids, tokens, logprobs, event.finish_reason)


@dataclass
class _Seq:
    seq_id: int
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    seed: int
    times: RequestTimes
    out: list[int] = field(default_factory=list)
    replica: int | None = None
    cached: int = 0  # tokens of prompt + out in the replica's KV cache
    reserve_pending: bool = True  # KV not yet reserved on the replica
    attempts: int = 0

    @property
    def lifetime(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    @property
    def known(self) -> int:
        return len(self.prompt) + len(self.out)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt + output, without joining the two (a decode step
        needs one token of what may be a very long sequence)."""
        p = len(self.prompt)
        if start >= p:
            return self.out[start - p:start - p + n]
        head = self.prompt[start:start + n]
        return head + self.out[:n - len(head)]


class Engine:
    def __init__(self, executor: Executor, config: EngineConfig | None = None) -> None:
        self.executor = executor
        self.config = config = config or EngineConfig()
        self.model_config = executor.config
        self.kv = executor.kv
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings, self.kv.tokens)
        self.slots_per_replica = min(config.max_num_seqs, self.kv.max_seqs)
        self._lock = threading.Condition()
        self._waiting: list[_Seq] = []
        self._running: list[_Seq] = []
        self._aborts: set[str] = set()
        self._by_request: dict[str, _Seq] = {}
        self._release: dict[int, list[int]] = {r: [] for r in range(executor.num_replicas)}
        self._free_blocks = [self.kv.num_blocks] * executor.num_replicas
        self._free_slots = [self.slots_per_replica] * executor.num_replicas
        self._ids = itertools.count()
        self._step_ids = itertools.count()
        self.steps = 0  # steps executed (tests count them to see batching)
        self.failures: list[tuple[float, str]] = []  # (monotonic time noticed, reason) per executor failure
        self.healthy = True
        self.last_error: str | None = None
        self._stopped = False
        self._draining = False
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               sink: Callable[[Event], None] | None = None) -> RequestHandle:
        validate_request(prompt_ids, params, self.model_config, self.max_model_len)
        with self._lock:
            if self._draining or self._stopped:
                raise EngineUnavailable("the server is shutting down")
            if not self.healthy:
                raise EngineUnavailable(self.last_error or "the engine is not healthy")
            if len(self._waiting) >= self.config.max_waiting:
                raise EngineOverloaded(f"{len(self._waiting)} requests are waiting; try again later")
            seq_id = next(self._ids)
            request_id = request_id or f"req-{seq_id}"
            if request_id in self._by_request:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            handle = RequestHandle(request_id, list(prompt_ids), sink)
            seed = params.seed if params.seed is not None else new_seed()
            seq = _Seq(seq_id, handle, list(prompt_ids), params, seed, RequestTimes(time.monotonic()))
            self._waiting.append(seq)
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
            used = [1 - f / self.kv.num_blocks for f in self._free_blocks]
            return EngineLoad(len(self._running), len(self._waiting), sum(used) / len(used), self.steps)

    def begin_drain(self) -> int:
        """Refuse new requests from now on; returns how many are still in flight."""
        with self._lock:
            self._draining = True
        return self.in_flight()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._running)

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
            for seq in self._waiting + self._running:
                self._finish(seq, "abort", "the server shut down before the request finished")
            self._waiting, self._running = [], []
        self.executor.shutdown()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopped and not (self._waiting or self._running or self._aborts
                                                     or any(self._release.values())):
                        self._lock.wait()
                    if self._stopped:
                        return
                    self._apply_aborts()
                    steps, chunk_seqs = self._schedule()
                if steps:
                    self._run(steps, chunk_seqs)
        except Exception as exc:  # a bug here must not leave clients waiting forever
            log.exception("engine loop failed")
            self._fail_everything(f"engine loop failed: {exc}")

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            seq = self._by_request.get(request_id)
            if seq is None or seq.times.finished is not None:
                continue
            if seq in self._waiting:
                self._waiting.remove(seq)
            self._end(seq, "abort")
        self._aborts.clear()

    def _admit(self) -> None:
        while self._waiting:
            seq = self._waiting[0]
            need = -(-seq.lifetime // self.kv.block_size)
            fits = [r for r in range(self.executor.num_replicas)
                    if self._free_slots[r] > 0 and self._free_blocks[r] >= need]
            if not fits:
                return
            r = max(fits, key=lambda i: (self._free_blocks[i], -i))
            self._free_slots[r] -= 1
            self._free_blocks[r] -= need
            seq.replica, seq.cached, seq.reserve_pending = r, 0, True
            self._running.append(self._waiting.pop(0))

    def _schedule(self) -> tuple[dict[int, ReplicaStep], dict[int, list[tuple[_Seq, int]]]]:
        self._admit()
        budget = max(self.config.max_num_batched_tokens, len(self._running))
        chunks: dict[int, list[ChunkPlan]] = {}
        chunk_seqs: dict[int, list[tuple[_Seq, int]]] = {}
        decoding = [s for s in self._running if s.cached >= len(s.prompt)]
        prefilling = [s for s in self._running if s.cached < len(s.prompt)]
        for seq in decoding + prefilling:
            n = min(seq.known - seq.cached, budget)
            if n <= 0:
                continue
            budget -= n
            plan = ChunkPlan(seq.seq_id, seq.cached, seq.tokens(seq.cached, n),
                             seq.lifetime if seq.reserve_pending else 0, seq.cached + n == seq.known,
                             seq.params, seq.seed, len(seq.out))
            seq.reserve_pending = False
            chunks.setdefault(seq.replica, []).append(plan)
            chunk_seqs.setdefault(seq.replica, []).append((seq, n))
        step_id = next(self._step_ids)
        steps = {}
        for r in range(self.executor.num_replicas):
            if chunks.get(r) or self._release[r]:
                steps[r] = ReplicaStep(step_id, self._release[r], chunks.get(r, []))
                self._release[r] = []
        return steps, chunk_seqs

    def _run(self, steps: dict[int, ReplicaStep], chunk_seqs: dict[int, list[tuple[_Seq, int]]]) -> None:
        now = time.monotonic()
        for pairs in chunk_seqs.values():
            for seq, _ in pairs:
                seq.times.scheduled = seq.times.scheduled or now
        try:
            results = self.executor.execute(steps)
        except ExecutorFailure as exc:
            self.failures.append((time.monotonic(), str(exc)))
            log.warning("step failed: %s", exc)
            self._recover(str(exc))
            return
        self.steps += 1
        with self._lock:
            self._apply(results, chunk_seqs)

    def _apply(self, results: dict[int, StepResult], chunk_seqs: dict[int, list[tuple[_Seq, int]]]) -> None:
        now = time.monotonic()
        for r, pairs in chunk_seqs.items():
            sampled = {s.seq_id: s for s in results[r].sampled}
            for seq, n in pairs:
                seq.cached += n
                if seq.times.finished is not None:  # aborted while the step ran
                    continue
                got = sampled.get(seq.seq_id)
                if got is None:
                    continue
                seq.out.append(got.token)
                seq.times.first_token = seq.times.first_token or now
                seq.times.token_times.append(now)
                seq.handle.emit(Event(seq.handle.request_id, got.token, got.logprob, got.top))
                if got.token in seq.params.stop_token_ids:
                    self._end(seq, "stop")
                elif len(seq.out) >= seq.params.max_tokens:
                    self._end(seq, "length")

    def _end(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        """Finish a sequence and give back its replica resources (caller holds the lock)."""
        if seq in self._running:
            self._running.remove(seq)
        if seq.replica is not None:
            self._release[seq.replica].append(seq.seq_id)
            self._free_slots[seq.replica] += 1
            self._free_blocks[seq.replica] += -(-seq.lifetime // self.kv.block_size)
            seq.replica = None
        self._finish(seq, reason, error)

    def _finish(self, seq: _Seq, reason: str, error: str | None = None) -> None:
        if seq.times.finished is not None:
            return
        seq.times.finished = time.monotonic()
        self._by_request.pop(seq.handle.request_id, None)
        seq.handle.emit(Event(seq.handle.request_id, finish_reason=reason, error=error, times=seq.times))

    def _recover(self, reason: str) -> None:
        try:
            self.executor.recover()
        except Exception as exc:
            log.exception("recovery failed")
            self._fail_everything(f"the cluster could not recover from '{reason}': {exc}")
            return
        with self._lock:
            resumed = []
            for seq in self._running:
                seq.attempts += 1
                seq.replica, seq.cached, seq.reserve_pending = None, 0, True
                if seq.attempts > self.config.max_attempts:
                    self._finish(seq, "error", f"gave up after {seq.attempts} failures; last: {reason}")
                else:
                    resumed.append(seq)
            self._running = []
            self._waiting = resumed + self._waiting  # resumed first, in their order
            self._release = {r: [] for r in self._release}
            self._free_blocks = [self.kv.num_blocks] * self.executor.num_replicas
            self._free_slots = [self.slots_per_replica] * self.executor.num_replicas

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            self.healthy = False
            self.last_error = message
            for seq in self._waiting + self._running:
                self._finish(seq, "error", message)
            self._waiting, self._running = [], []
