"""The scheduler's verbs without a model: admission and the overload refusal, chunked prefill and
short-before-long steps, abort, stop checks, recovery after an executor failure, drain. Sequences are
built by hand, and a fake step output (one token per sampling chunk) stands in for the executor."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import EngineConfig, KVSpec
from cluster.dataplane.messages import ChunkPlan, Sampled, StepResult
from cluster.engine.events import EngineOverloaded, RequestHandle, RequestTimes
from cluster.engine.scheduler import Generated, Schedule, Scheduler, Seq
from model_shards.sampling import SamplingParams

BS, WINDOW = 16, 32
REPO = Path(__file__).resolve().parents[3]


class Clock:
    """A clock that ticks once per reading: every stamp is distinct and ordered."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_scheduler(num_blocks: int = 64, max_seqs: int = 8, **config: int) -> Scheduler:
    return Scheduler(EngineConfig(**config), KVSpec(num_blocks, BS, max_seqs), 1, WINDOW, clock=Clock())


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 4, stop: tuple[int, ...] = (),
             prompt: list[int] | None = None, leader: Seq | None = None) -> Seq:
    prompt = prompt if prompt is not None else [seq_id * 1000 + i for i in range(prompt_len)]  # no shared prefix
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop)
    return Seq(seq_id, RequestHandle(f"req-{seq_id}", prompt, None), prompt, params, seed=seq_id,
               times=RequestTimes(0.0), leader=leader)


def plans(schedule: Schedule, replica: int = 0) -> list[ChunkPlan]:
    return schedule.steps[replica].chunks if replica in schedule.steps else []


def chunk_sizes(schedule: Schedule, replica: int = 0) -> list[tuple[int, int]]:
    """(seq_id, tokens it runs) of the step, in chunk order."""
    return [(seq.seq_id, n) for seq, n in schedule.chunks.get(replica, [])]


def fake_results(schedule: Schedule, tokens: dict[int, int] | None = None) -> dict[int, StepResult]:
    """What the executor would answer: a token for every chunk that samples (1, unless `tokens` says)."""
    tokens = tokens or {}
    return {r: StepResult(step.step_id, r, [Sampled(p.seq_id, tokens.get(p.seq_id, 1), None)
                                            for p in step.chunks if p.sample], 0.0, 0.0, 0.0)
            for r, step in schedule.steps.items()}


def run_step(sched: Scheduler, tokens: dict[int, int] | None = None) -> tuple[Schedule, list[Generated]]:
    schedule = sched.schedule()
    return schedule, sched.update_from_output(schedule, fake_results(schedule, tokens))


def held_blocks(sched: Scheduler) -> int:
    return sum(kv.full.used for kv in sched.replicas)


# -- admission ----------------------------------------------------------------------------------------
def test_admission_fills_free_slots_then_refuses_beyond_max_waiting() -> None:
    sched = make_scheduler(max_num_seqs=1, max_waiting=1)
    a, b, c = make_seq(0, 10), make_seq(1, 10), make_seq(2, 10)
    sched.add(a)
    assert sched.admitted == (a,) and sched.num_waiting == 0  # a free slot: admitted at once, never waiting
    sched.add(b)
    assert sched.queued == (b,)
    with pytest.raises(EngineOverloaded, match="1 requests are waiting"):
        sched.add(c)
    assert sched.queued == (b,) and sched.num_unfinished == 2  # the refused one is forgotten
    sched.abort([a])
    sched.schedule()
    assert sched.admitted == (b,) and sched.num_waiting == 0


def test_requests_with_room_never_count_as_waiting() -> None:
    sched = make_scheduler(max_num_seqs=4, max_waiting=1)
    for i in range(4):
        sched.add(make_seq(i, 8))
    assert (sched.num_running, sched.num_waiting) == (4, 0)
    sched.add(make_seq(4, 8))  # no slot left: the one waiting request max_waiting allows
    with pytest.raises(EngineOverloaded):
        sched.add(make_seq(5, 8))


def test_the_oldest_waiting_request_is_not_overtaken() -> None:
    sched = make_scheduler(num_blocks=8)
    a, big, small = make_seq(0, 60), make_seq(1, 76), make_seq(2, 12)  # lifetimes of 4, 5 and 1 blocks
    for seq in (a, big, small):
        sched.add(seq)
    assert sched.admitted == (a,)
    assert sched.queued == (big, small)  # small would fit beside a, but big came first
    sched.abort([a])
    sched.schedule()
    assert sched.admitted == (big, small)


def test_a_follower_waits_for_its_leaders_prompt_and_shares_it() -> None:
    sched = make_scheduler()
    leader = make_seq(0, 40)
    follower = make_seq(1, 40, prompt=list(leader.prompt), leader=leader)
    other = make_seq(2, 10)
    for seq in (leader, follower, other):
        sched.add(seq)
    assert sched.admitted == (leader, other) and sched.queued == (follower,)  # later requests may go first
    run_step(sched)  # the leader's prompt is computed, and cached
    sched.schedule()
    assert follower in sched.admitted
    assert follower.hit == 32  # its two whole blocks (one token is left to compute)
    assert sched.replicas[0].seqs[follower.seq_id].full[:2] == sched.replicas[0].seqs[leader.seq_id].full[:2]


# -- steps --------------------------------------------------------------------------------------------
def test_a_long_prompt_is_prefilled_in_chunks_then_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=50)
    seq = make_seq(0, 120, max_tokens=8)
    sched.add(seq)
    for start, n in ((0, 50), (50, 50)):
        schedule, generated = run_step(sched)
        (plan,) = plans(schedule)
        assert (plan.start, len(plan.token_ids), plan.sample) == (start, n, False)
        assert generated == [] and seq.cached == start + n and seq.out == []
    schedule, generated = run_step(sched, {0: 77})
    (plan,) = plans(schedule)
    assert (plan.start, plan.token_ids, plan.sample) == (100, seq.prompt[100:], True)
    assert [g.sampled.token for g in generated] == [77] and seq.out == [77]
    schedule, _ = run_step(sched)
    (plan,) = plans(schedule)
    assert (plan.start, plan.token_ids, plan.index) == (120, [77], 1)  # decode: the last sampled token


def test_every_decoding_sequence_gets_a_token_even_past_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=2)
    seqs = [make_seq(i, 1, max_tokens=8) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    while any(not s.out for s in seqs):
        run_step(sched)
    schedule, generated = run_step(sched)
    assert chunk_sizes(schedule) == [(0, 1), (1, 1), (2, 1)] and len(generated) == 3


def test_short_prompts_go_before_long_ones_and_long_ones_progress_one_at_a_time() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)  # long: more than 16 tokens left to prefill
    long1, long2, short = make_seq(0, 300), make_seq(1, 300), make_seq(2, 8, max_tokens=8)
    for seq in (long1, long2, short):
        sched.add(seq)
    schedule, generated = run_step(sched)
    assert chunk_sizes(schedule) == [(2, 8), (0, 56)]  # the short one first; one long prefill at a time
    assert [g.seq for g in generated] == [short]
    schedule, _ = run_step(sched)
    assert chunk_sizes(schedule) == [(2, 1), (0, 63)]  # decode first, then the long prefill goes on
    late = make_seq(3, 10)
    sched.add(late)
    schedule, generated = run_step(sched)
    assert chunk_sizes(schedule) == [(2, 1), (3, 10), (0, 53)]
    assert late in [g.seq for g in generated]  # its first token at the end of the next step


@pytest.mark.parametrize("partial, expected", [(1, [(0, 40)]), (2, [(0, 40), (1, 40)])])
def test_at_most_max_num_partial_prefills_long_prompts_share_a_step(partial: int,
                                                                    expected: list[tuple[int, int]]) -> None:
    sched = make_scheduler(max_num_batched_tokens=128, max_num_partial_prefills=partial)  # long: over 32
    for i in range(3):
        sched.add(make_seq(i, 40))
    schedule, _ = run_step(sched)
    assert chunk_sizes(schedule) == expected  # oldest first; budget is left, yet no more long prompts


# -- abort --------------------------------------------------------------------------------------------
def test_abort_frees_the_blocks_and_tells_the_replica_at_the_next_step() -> None:
    sched = make_scheduler(max_num_seqs=1)
    seq, waiting = make_seq(0, 40, max_tokens=100), make_seq(1, 10)
    sched.add(seq)
    sched.add(waiting)
    run_step(sched)
    assert held_blocks(sched) == 3 and sched.kv_usage() > 0  # the prompt's blocks (the rest only reserved)
    done = sched.abort([seq, waiting])
    assert [(d.seq, d.reason, d.replica) for d in done] == [(seq, "abort", 0), (waiting, "abort", None)]
    assert seq.finished and waiting.finished and sched.num_unfinished == 0
    assert held_blocks(sched) == 0 and sched.replicas[0].seqs == {}
    assert sched.has_work  # the replica must still learn of the release
    schedule = sched.schedule()
    assert schedule.steps[0].release == [seq.seq_id] and schedule.steps[0].chunks == []
    assert not sched.has_work
    assert sched.abort([seq]) == []  # already finished: nothing more


def test_a_token_for_a_sequence_aborted_during_its_step_is_dropped() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 10)
    sched.add(seq)
    schedule = sched.schedule()
    sched.abort([seq])
    assert sched.update_from_output(schedule, fake_results(schedule)) == [] and seq.out == []


# -- stops --------------------------------------------------------------------------------------------
def test_finishes_at_max_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 20, max_tokens=3)
    sched.add(seq)
    outs = [run_step(sched, {0: t})[1] for t in (5, 6, 7)]
    assert [[g.finished for g in out] for out in outs[:2]] == [[None], [None]]
    (last,) = outs[2]
    assert last.finished is not None and (last.finished.reason, last.finished.replica) == ("length", 0)
    assert seq.out == [5, 6, 7] and seq.finished
    assert sched.num_running == 0 and held_blocks(sched) == 0
    times = seq.times
    assert times.scheduled < times.first_token == times.token_times[0] < times.token_times[-1] < times.finished
    assert len(times.token_times) == 3


def test_finishes_at_a_stop_token_before_max_tokens() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 20, max_tokens=8, stop=(7,))
    sched.add(seq)
    assert run_step(sched, {0: 5})[1][0].finished is None
    (out,) = run_step(sched, {0: 7})[1]
    assert out.finished is not None and out.finished.reason == "stop"
    assert seq.out == [5, 7] and sched.num_running == 0 and held_blocks(sched) == 0


def test_a_stop_token_at_max_tokens_is_a_stop() -> None:
    sched = make_scheduler()
    seq = make_seq(0, 20, max_tokens=1, stop=(7,))
    sched.add(seq)
    (out,) = run_step(sched, {0: 7})[1]
    assert out.finished is not None and out.finished.reason == "stop"


# -- recovery -----------------------------------------------------------------------------------------
def test_recovery_requeues_running_sequences_with_their_tokens_and_frees_all_kv() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=40, long_prefill_token_threshold=16)
    a, b, c = make_seq(0, 10, max_tokens=8), make_seq(1, 100), make_seq(2, 10)
    for seq in (a, b, c):
        sched.add(seq)
    assert chunk_sizes(run_step(sched, {0: 5})[0]) == [(0, 10), (1, 30)]
    run_step(sched, {0: 6})
    assert a.out == [5, 6] and b.cached == 69 and held_blocks(sched) > 0
    assert sched.recover("boom") == []
    assert sched.num_running == 0 and sched.queued == (a, b, c)  # resumed first, in their order
    assert held_blocks(sched) == 0 and sched.replicas[0].seqs == {}
    assert (a.cached, a.replica, a.attempts, a.out) == (0, None, 1, [5, 6])
    schedule = sched.schedule()
    assert sched.admitted == (a, b)
    plan_a, plan_b = plans(schedule)
    assert (plan_a.start, plan_a.token_ids, plan_a.sample, plan_a.index) == (0, a.prompt + [5, 6], True, 2)
    assert (plan_b.start, len(plan_b.token_ids)) == (0, 28)  # prefilled again from the start
    assert len(plan_a.blocks.full) == 1  # the replica learns its blocks anew
    generated = sched.update_from_output(schedule, fake_results(schedule, {0: 9}))
    assert a.out == [5, 6, 9] and [g.seq for g in generated] == [a]


def test_recovery_drops_pending_releases_and_gives_up_after_max_attempts() -> None:
    sched = make_scheduler(max_attempts=1)
    a, b = make_seq(0, 10, max_tokens=8), make_seq(1, 10, max_tokens=8)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.abort([b])  # its release waits for the next step
    assert sched.recover("boom") == []
    schedule = sched.schedule()  # this step fails too: nothing comes back
    assert schedule.steps[0].release == [] and [p.seq_id for p in plans(schedule)] == [0]  # all forgotten
    (done,) = sched.recover("boom again")
    assert (done.seq, done.reason, done.replica) == (a, "error", None)
    assert done.error == "gave up after 2 failures; last: boom again"
    assert a.finished and sched.num_unfinished == 0 and not sched.has_work


# -- resize -------------------------------------------------------------------------------------------
def test_a_resize_adds_empty_replicas_and_moves_the_removed_ones_sequences() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a, b, c = make_seq(0, 10, max_tokens=8), make_seq(1, 10, max_tokens=8), make_seq(2, 10, max_tokens=8)
    for seq in (a, b, c):
        sched.add(seq)
    assert sched.admitted == (a,) and sched.resize(2) == 0  # growing moves nothing
    run_step(sched, {0: 5, 1: 7})
    assert (a.replica, b.replica, b.out) == (0, 1, [7]) and sched.queued == (c,)
    blocks_a = held_blocks(sched) - sched.replicas[1].full.used
    assert sched.resize(1) == 1  # b's replica goes: b waits again, ahead of c, keeping its tokens
    assert len(sched.replicas) == 1 and held_blocks(sched) == blocks_a and a.cached == 10
    assert sched.queued == (b, c) and (b.replica, b.cached, b.attempts, b.out) == (None, 0, 0, [7])
    run_step(sched, {0: 6})  # a decodes on, untouched
    assert a.out == [5, 6] and sched.num_running == 1 and set(sched.schedule().steps) == {0}


# -- drain --------------------------------------------------------------------------------------------
def test_drain_ends_everything_waiting_first() -> None:
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = make_seq(0, 10), make_seq(1, 10)
    sched.add(running)
    sched.add(waiting)
    finished = sched.drain("abort", "shutting down")
    assert [(f.seq, f.reason, f.error) for f in finished] == [(waiting, "abort", "shutting down"),
                                                              (running, "abort", "shutting down")]
    assert running.finished and waiting.finished and sched.num_unfinished == 0
    assert sched.drain("error", "again") == []


# -- this module stays model-free ---------------------------------------------------------------------
FORBIDDEN = ("cluster.engine.executor", "cluster.actors", "model_shards.model", "model_shards.weights",
             "model_shards.loader", "model_shards.moe", "model_shards.attention")


def forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_this_module_imports_no_executor_and_no_model_code() -> None:
    tree = ast.parse(Path(__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
    assert "cluster.engine.scheduler" in imported and not [m for m in imported if forbidden(m)]
    # and transitively: importing it loads neither an executor nor the model's code
    code = ("import sys, tests.cluster.engine.test_scheduler; "
            f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
