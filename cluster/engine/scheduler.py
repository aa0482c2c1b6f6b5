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

The engine thread owns the scheduler: every call happens under the engine's lock.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from cluster.engine.block_pool import chain_hashes, extend_hashes
from cluster.config import EngineConfig, KVSpec
from cluster.engine.events import RequestHandle, RequestTimes
from cluster.engine.kv_manager import ReplicaKV
from cluster.dataplane.messages import ChunkPlan, ReplicaStep
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


@dataclass
class Schedule:
    steps: dict[int, ReplicaStep]  # replica -> its part of the step
    chunks: dict[int, list[tuple[Seq, int]]]  # replica -> (sequence, tokens it runs), in chunk order


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVSpec, num_replicas: int, window: int) -> None:
        self.config = config
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

    # -- sequences -------------------------------------------------------------------------------
    def end(self, seq: Seq) -> None:
        """Take a sequence out (finished, aborted, failed): its blocks go back to its replica's pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.replica is not None:
            self.replicas[seq.replica].release(seq.seq_id)
            self._release[seq.replica].append(seq.seq_id)
            seq.replica = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or any(self._release.values()))

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

    def admit(self) -> None:
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
        self.admit()
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
        return Schedule(steps, chunks)

    def computed(self, seq: Seq, n: int) -> None:
        """A step ran `n` more of the sequence's tokens: they are in its replica's cache now."""
        seq.cached += n
        if seq.replica is not None and seq.hashes is not None:
            self.replicas[seq.replica].computed(seq.seq_id, seq.cached, seq.hashes)

    def appended(self, seq: Seq, token: int) -> None:
        """A generated token: once it completes a block, that block gets its hash."""
        seq.out.append(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        if seq.hashes is None:
            return
        done, bs = len(seq.hashes) * self.kv.block_size, self.kv.block_size
        if seq.known - done >= bs:
            extend_hashes(seq.hashes, seq.tokens(done, seq.known - done), bs)

    def reset(self) -> list[Seq]:
        """Every replica's KV is gone (recovery): forget all blocks; returns the running sequences,
        which must be admitted (and prefilled) again."""
        for kv in self.replicas:
            kv.reset()
        running, self.running = self.running, []
        for seq in running:
            seq.replica, seq.cached, seq.hit = None, 0, 0
        self._release = {r: [] for r in self._release}
        return running

    # -- telemetry -------------------------------------------------------------------------------
    def kv_usage(self) -> float:
        return sum(kv.usage() for kv in self.replicas) / len(self.replicas)

    def kv_cached_share(self) -> float:
        return sum(kv.cached_share() for kv in self.replicas) / len(self.replicas)
