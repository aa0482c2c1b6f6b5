"""The scheduler: which sequences run in the next step, on which attention replica, with which KV blocks.

Each step gives every running sequence in decode one token, then fills the rest of the token budget
with prefill chunks: short prompts first (at most `long_prefill_token_threshold` tokens left), in
arrival order, then at most `max_num_partial_prefills` long ones (vLLM's names), oldest first. So a
short request that arrives while a long prompt is being prefilled gets its first token at the end of
the next step, and several long prompts do not all slow down at once.

Waiting requests are admitted in arrival order while some replica has a free sequence slot and KV
room for the request's whole lifetime (prompt + max_tokens, less what the prefix cache already
holds): reserving up front means a running sequence never has to be preempted. The KV blocks themselves are allocated by the replica's `ReplicaKV` (kv_manager.py).

Placement over several replicas: a request goes to the replica whose prefix cache holds the longest
part of its prompt, unless that replica runs more than `load_slack` (a quarter of the sequence slots,
at least 1) sequences more than the least loaded replica that also has room; ties go to the replica
with the most free KV.

The scheduler owns every sequence from `add` to its end: the queues, the KV books, the output tokens
and the stop checks. The engine calls its verbs (add, abort, schedule, update_from_output, recover,
drain), runs the steps and turns what the verbs return into events; it never touches the queues.
Every call happens under the engine's lock.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from cluster.engine.block_pool import chain_hashes, extend_hashes
from cluster.config import EngineConfig, KVSpec
from cluster.engine.events import EngineOverloaded, RequestHandle, RequestTimes
from cluster.engine.kv_manager import ReplicaKV
from cluster.dataplane.messages import ChunkPlan, ReplicaStep, Sampled, StepResult
from model_shards.grammar import Constraint
from model_shards.sampling import SamplingParams


@dataclass(eq=False)
class Seq:
    seq_id: int
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    seed: int
    times: RequestTimes
    leader: Seq | None = None  # n > 1: admitted once this sequence's prompt is in the cache, to share it
    out: list[int] = field(default_factory=list)
    hashes: list[bytes] | None = None  # of its complete blocks of prompt + out (from its first admission on)
    replica: int | None = None
    cached: int = 0  # tokens of prompt + out whose KV the replica holds (computed, or from the prefix cache)
    hit: int = 0  # tokens that came from the prefix cache at its last admission
    attempts: int = 0  # executor failures it lived through
    history_sent: bool = False  # its replica has its penalty history (since its last admission)
    # structured output: the grammar's state, advanced with `out` (so a failure of the replicas loses
    # nothing); each sampling chunk carries its mask, and the replicas get params without the grammar
    constraint: Constraint | None = None
    sent_params: SamplingParams | None = None

    def __post_init__(self) -> None:
        if self.params.grammar is not None:
            self.constraint = self.constraint or Constraint(self.params.grammar, self.out)
            self.sent_params = dataclasses.replace(self.params, grammar=None)
        else:
            self.sent_params = self.params

    @property
    def lifetime(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    @property
    def known(self) -> int:
        return len(self.prompt) + len(self.out)

    @property
    def finished(self) -> bool:
        return self.times.finished is not None

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens [start, start + n) of prompt + output, without joining the two (a decode step
        needs one token of what may be a very long sequence)."""
        p = len(self.prompt)
        if start >= p:
            return self.out[start - p:start - p + n]
        head = self.prompt[start:start + n]
        return head + self.out[:n - len(head)]

    def waits_for_leader(self) -> bool:
        leader = self.leader
        return leader is not None and not leader.finished and (leader.replica is None
                                                                or leader.cached < len(leader.prompt))

    def stop_reason(self) -> str | None:
        """Why the sequence ends now that its last token joined `out`: a stop token, or max_tokens."""
        if self.out[-1] in self.params.stop_token_ids:
            return "stop"
        if len(self.out) >= self.params.max_tokens:
            return "length"
        return None


@dataclass
class Schedule:
    steps: dict[int, ReplicaStep]  # replica -> its part of the step
    chunks: dict[int, list[tuple[Seq, int]]]  # replica -> (sequence, tokens it runs), in chunk order


@dataclass
class Finished:
    """A sequence the scheduler took out for good: the engine sends its final event."""

    seq: Seq
    reason: str  # stop | length | abort | error
    error: str | None = None
    replica: int | None = None  # the replica that ran it last, when its final event names one


@dataclass
class Generated:
    """A token a step produced for a sequence (in step order), and the end it caused, if any."""

    seq: Seq
    sampled: Sampled
    finished: Finished | None = None


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVSpec, num_replicas: int, window: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock  # stamps the requests' times (scheduled, tokens, finished)
        self.kv = kv
        self.slots = min(config.max_num_seqs, kv.max_seqs)
        self.load_slack = max(1, self.slots // 4)
        self.replicas = [ReplicaKV(kv.num_blocks, kv.sliding_blocks(window), kv.block_size, window,
                                   config.prefix_caching) for _ in range(num_replicas)]
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self._release: dict[int, list[int]] = {r: [] for r in range(num_replicas)}
        self._step_ids = itertools.count()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache (counters, since start)
        self.prefix_hits = 0  # of which its KV was reused

    # -- what the engine reads -------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def queued(self) -> tuple[Seq, ...]:
        """The waiting sequences, in the order admission tries them."""
        return tuple(self.waiting)

    @property
    def admitted(self) -> tuple[Seq, ...]:
        """The running sequences, in admission order."""
        return tuple(self.running)

    @property
    def has_work(self) -> bool:
        """Whether a step would do anything: run a sequence, or tell a replica to release blocks."""
        return bool(self.waiting or self.running or any(self._release.values()))

    # -- sequences in and out --------------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        """Queue a new sequence and admit what fits. What the next step would run is not waiting: only
        the rest counts, and a sequence left waiting behind more than `max_waiting` others is forgotten
        and refused with EngineOverloaded."""
        self.waiting.append(seq)
        self._admit()
        if seq in self.waiting and len(self.waiting) > self.config.max_waiting:
            self.waiting.remove(seq)
            raise EngineOverloaded(f"{len(self.waiting)} requests are waiting; try again later")

    def abort(self, seqs: Iterable[Seq]) -> list[Finished]:
        """End these sequences (their clients gave up); the ones already finished are left alone. Their
        blocks go back to the pools now, and their replicas forget them at the next step."""
        return [self._end(seq, "abort") for seq in seqs if not seq.finished]

    def recover(self, reason: str) -> list[Finished]:
        """Every replica's KV is gone (the executor recovered from `reason`): forget all blocks and queue
        every running sequence again, ahead of the waiting ones and in its order, to be prefilled from
        its prompt plus the tokens it already produced; seeded, counter-based sampling makes the
        continuation exactly what it would have been. A sequence that has now lived through more than
        `max_attempts` failures ends with an error instead; returns those."""
        for kv in self.replicas:
            kv.reset()
        self._release = {r: [] for r in self._release}
        resumed, gave_up = [], []
        for seq in self.running:
            seq.replica, seq.cached, seq.hit = None, 0, 0
            seq.attempts += 1
            if seq.attempts > self.config.max_attempts:
                gave_up.append(self._finish(seq, "error", f"gave up after {seq.attempts} failures; last: {reason}"))
            else:
                resumed.append(seq)
        self.running = []
        self.waiting = resumed + self.waiting  # resumed first, in their order
        return gave_up

    def resize(self, num_replicas: int) -> int:
        """The executor switched to `num_replicas` attention replicas (resize.py). New replicas start
        empty; the sequences of removed ones (the highest indices) lose their KV and go back to the
        front of the queue, in their order, to be prefilled again on the remaining replicas, as after a
        failure but without counting an attempt. The sequences of surviving replicas are untouched.
        -> how many sequences moved."""
        old = len(self.replicas)
        for r in range(old, num_replicas):
            self.replicas.append(ReplicaKV(self.kv.num_blocks, self.replicas[0].sliding.num_blocks, self.kv.block_size,
                                           self.replicas[0].window, self.config.prefix_caching))
            self._release[r] = []
        moved = [s for s in self.running if s.replica is not None and s.replica >= num_replicas]
        for seq in moved:
            seq.replica, seq.cached, seq.hit = None, 0, 0
        del self.replicas[num_replicas:]
        self._release = {r: ids for r, ids in self._release.items() if r < num_replicas}
        self.running = [s for s in self.running if s not in moved]
        self.waiting = moved + self.waiting
        return len(moved)

    def drain(self, reason: str, error: str) -> list[Finished]:
        """End every sequence, waiting ones first (shutdown, or an executor that cannot recover). The KV
        books are left as they are: the executor behind them is shutting down or broken."""
        seqs, self.waiting, self.running = self.waiting + self.running, [], []
        return [self._finish(seq, reason, error) for seq in seqs if not seq.finished]

    def _end(self, seq: Seq, reason: str) -> Finished:
        """Finish a sequence and give back its replica resources; its final event names the replica."""
        replica = seq.replica
        self._remove(seq)
        return self._finish(seq, reason, replica=replica)

    def _remove(self, seq: Seq) -> None:
        """Take a sequence out (finished, aborted): its blocks go back to its replica's pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.replica is not None:
            self.replicas[seq.replica].release(seq.seq_id)
            self._release[seq.replica].append(seq.seq_id)
            seq.replica = None

    def _finish(self, seq: Seq, reason: str, error: str | None = None, replica: int | None = None) -> Finished:
        seq.times.finished = self.clock()
        return Finished(seq, reason, error, replica)

    # -- admission -------------------------------------------------------------------------------
    def _count(self, replica: int) -> int:
        return sum(s.replica == replica for s in self.running)

    def _place(self, seq: Seq) -> tuple[int, int] | None:
        """(replica, prefix-cache hit in tokens), or None while no replica has room."""
        if seq.hashes is None:
            seq.hashes = chain_hashes(seq.tokens(0, seq.known), self.kv.block_size)
        counts = [self._count(r) for r in range(len(self.replicas))]
        room = []
        for r, kv in enumerate(self.replicas):
            if counts[r] >= self.slots:
                continue
            hit = kv.match(seq.hashes, seq.known)
            if kv.fits(seq.hashes, hit, seq.lifetime):
                room.append((r, hit))
        if not room:
            return None
        least = min(room, key=lambda c: (counts[c[0]], c[0]))
        best = max(room, key=lambda c: (c[1], self.replicas[c[0]].full.free, -c[0]))
        if counts[best[0]] - counts[least[0]] > self.load_slack:
            return least
        return best

    def _admit(self) -> None:
        i = 0
        while i < len(self.waiting):
            seq = self.waiting[i]
            if seq.waits_for_leader():
                i += 1  # its leader's prompt is not cached yet; later requests may go first
                continue
            placed = self._place(seq)
            if placed is None:
                return  # the oldest request waits for room; nothing overtakes it
            r, hit = placed
            assert seq.hashes is not None
            self.replicas[r].admit(seq.seq_id, seq.hashes, hit, seq.lifetime)
            self.prefix_queries += seq.known
            self.prefix_hits += hit
            seq.replica, seq.cached, seq.hit, seq.history_sent = r, hit, hit, False
            self.running.append(self.waiting.pop(i))

    # -- steps -----------------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        """Admit what fits, then plan the next step (the module's docstring says in which order)."""
        self._admit()
        budget = max(self.config.max_num_batched_tokens, len(self.running))
        plans: dict[int, list[ChunkPlan]] = {}
        chunks: dict[int, list[tuple[Seq, int]]] = {}
        decoding = [s for s in self.running if s.cached >= len(s.prompt)]
        prefilling = [s for s in self.running if s.cached < len(s.prompt)]
        threshold = self.config.long_prefill
        short = [s for s in prefilling if s.known - s.cached <= threshold]
        long = sorted((s for s in prefilling if s.known - s.cached > threshold), key=lambda s: s.cached == 0)
        for seq in decoding + short + long[:self.config.max_num_partial_prefills]:
            n = min(seq.known - seq.cached, budget)
            if n <= 0:
                continue
            budget -= n
            assert seq.replica is not None
            blocks = self.replicas[seq.replica].plan(seq.seq_id, seq.cached, seq.cached + n)
            history = None
            if seq.params.penalized and not seq.history_sent:
                history, seq.history_sent = (tuple(seq.prompt), tuple(seq.out)), True
            sample = seq.cached + n == seq.known
            mask = None
            if sample and seq.constraint is not None:
                mask = seq.constraint.mask(seq.params.stop_token_ids, len(seq.out) >= seq.params.min_tokens)
            assert seq.sent_params is not None
            plan = ChunkPlan(seq.seq_id, seq.cached, seq.tokens(seq.cached, n), blocks, sample, seq.sent_params,
                             seq.seed, len(seq.out), history, mask)
            plans.setdefault(seq.replica, []).append(plan)
            chunks.setdefault(seq.replica, []).append((seq, n))
        step_id = next(self._step_ids)
        steps = {}
        for r in range(len(self.replicas)):
            if plans.get(r) or self._release[r]:
                steps[r] = ReplicaStep(step_id, self._release[r], plans.get(r, []))
                self._release[r] = []
        self._stamp_scheduled(chunks)
        return Schedule(steps, chunks)

    def _stamp_scheduled(self, chunks: dict[int, list[tuple[Seq, int]]]) -> None:
        now = self.clock()
        for pairs in chunks.values():
            for seq, _ in pairs:
                seq.times.scheduled = seq.times.scheduled or now

    def update_from_output(self, schedule: Schedule, results: dict[int, StepResult]) -> list[Generated]:
        """Book a step that ran: its chunks' tokens are in their replicas' caches now, each sampled token
        joins its sequence's output, and a sequence that produced a stop token or reached max_tokens
        ends (its blocks go back). Returns the sampled tokens in step order."""
        now = self.clock()
        generated = []
        for r, pairs in schedule.chunks.items():
            sampled = {s.seq_id: s for s in results[r].sampled}
            for seq, n in pairs:
                self._computed(seq, n)
                got = sampled.get(seq.seq_id)
                if got is None or seq.finished:
                    continue
                self._appended(seq, got.token)
                seq.times.first_token = seq.times.first_token or now
                seq.times.token_times.append(now)
                reason = seq.stop_reason()
                generated.append(Generated(seq, got, None if reason is None else self._end(seq, reason)))
        return generated

    def _computed(self, seq: Seq, n: int) -> None:
        """A step ran `n` more of the sequence's tokens: they are in its replica's cache now."""
        seq.cached += n
        if seq.replica is not None and seq.hashes is not None:
            self.replicas[seq.replica].computed(seq.seq_id, seq.cached, seq.hashes)

    def _appended(self, seq: Seq, token: int) -> None:
        """A generated token: once it completes a block, that block gets its hash."""
        seq.out.append(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if seq.hashes is None:
            return
        done, bs = len(seq.hashes) * self.kv.block_size, self.kv.block_size
        if seq.known - done >= bs:
            extend_hashes(seq.hashes, seq.tokens(done, seq.known - done), bs)

    # -- telemetry -------------------------------------------------------------------------------
    def kv_usage(self) -> float:
        return sum(kv.usage() for kv in self.replicas) / len(self.replicas)

    def kv_cached_share(self) -> float:
        return sum(kv.cached_share() for kv in self.replicas) / len(self.replicas)
