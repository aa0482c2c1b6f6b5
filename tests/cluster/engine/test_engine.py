"""The engine on the local executor: batching, chunked prefill, admission, abort, recovery."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jsonschema

import pytest
import torch

from cluster.config import EngineConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.events import EngineOverloaded, EngineUnavailable
from cluster.engine.executor import Executor, ExecutorFailure, LocalExecutor
from cluster.dataplane.messages import ActorInfo, ReplicaStep, StepResult
from cluster.telemetry import ExecutorStats
from model_shards import grammar
from model_shards.kv_cache import KVCache, KVCacheFull
from model_shards.requests import InvalidRequest
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import decode

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
KV = KVSpec(num_blocks=256, block_size=16, max_seqs=16)


def prompts(*lengths: int, seed: int = 11) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def local(tiny_hf: Path) -> LocalExecutor:
    return LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV)


def engine(executor: Executor, **config: int) -> Engine:
    inner = executor.inner if isinstance(executor, FlakyExecutor) else executor
    inner.recover()  # a fresh, empty cache for every test
    return Engine(executor, EngineConfig(**config))


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_batched_equals_one_at_a_time(local: LocalExecutor) -> None:
    eng = engine(local)
    ps = prompts(5, 140, 300)  # shorter than, longer than, and over twice the window
    together = eng.generate(ps, GREEDY)
    for prompt, batched in zip(ps, together):
        alone = eng.generate([prompt], GREEDY)[0]
        assert batched.token_ids == alone.token_ids
        assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_chunked_prefill_equals_whole_prefill(local: LocalExecutor) -> None:
    ps = prompts(300, 37)
    whole = engine(local).generate(ps, GREEDY)
    chunked_engine = engine(local, max_num_batched_tokens=50)
    chunked = chunked_engine.generate(ps, GREEDY)
    assert chunked_engine.steps > len(whole[0].token_ids) + 300 // 50 - 1  # the prompt really was chunked
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_requests_arriving_later_share_decode_steps(local: LocalExecutor) -> None:
    eng = engine(local)
    long_params = SamplingParams(max_tokens=30, temperature=0.0)
    first = eng.submit(prompts(20)[0], long_params)
    for _ in range(5):  # the first request is decoding when the second arrives
        assert first.events.get(timeout=30).token is not None
    second = eng.submit(prompts(12, seed=5)[0], long_params)
    first.result(timeout=60), second.result(timeout=60)
    # alone they would need 30 + 30 steps; together they overlap for most of them
    assert eng.steps < 30 + 30 - 15, eng.steps


def test_abort_frees_kv(local: LocalExecutor) -> None:
    eng = engine(local)
    handle = eng.submit(prompts(40)[0], SamplingParams(max_tokens=200, temperature=0.0))
    assert handle.events.get(timeout=30).token is not None
    assert eng.load().kv_usage > 0 and local.cache.usage() > 0
    eng.abort(handle.request_id)
    while (event := handle.events.get(timeout=30)).finish_reason is None:
        pass
    assert event.finish_reason == "abort"
    assert wait_until(lambda: local.cache.usage() == 0)  # the replica freed the blocks, not just the books
    assert eng.load().kv_usage == 0 and eng.load().running == 0


def test_stop_tokens(local: LocalExecutor) -> None:
    eng = engine(local)
    first = eng.generate(prompts(10), GREEDY)[0]
    stop_at = first.token_ids[2]
    stopped = eng.generate(prompts(10), SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[:first.token_ids.index(stop_at) + 1]
    assert first.finish_reason == "length" and len(first.token_ids) == 8


def test_seeded_sampling_is_reproducible_and_batch_independent(local: LocalExecutor) -> None:
    eng = engine(local)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    p1, p2 = prompts(12, 30)
    alone = eng.generate([p1], params)[0]
    again = eng.generate([p2, p1], [SamplingParams(max_tokens=8, seed=9), params])[1]
    assert alone.token_ids == again.token_ids
    other = eng.generate([p1], SamplingParams(max_tokens=8, temperature=1.0, seed=6))[0]
    assert other.token_ids != alone.token_ids


def test_kv_budget_limits_admission(tiny_hf: Path) -> None:
    small = LocalExecutor(ModelSource(str(tiny_hf), "float32"), KVSpec(num_blocks=8, block_size=16, max_seqs=8))
    eng = engine(small)
    # each request needs 3 blocks (40 + 8 tokens): at most 2 at a time fit in 8 blocks
    outs = eng.generate(prompts(40, 40, 40, 40), GREEDY, timeout=60)
    assert all(len(o.token_ids) == 8 for o in outs)
    assert eng.steps >= 2 * 8  # two waves
    with pytest.raises(InvalidRequest, match="context length of 128"):
        eng.submit(prompts(125)[0], GREEDY)  # can never fit: refused at once, not queued forever


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([5, 201088], "outside the vocabulary"),
                                             ([-1], "outside the vocabulary")])
def test_invalid_requests(local: LocalExecutor, prompt: list[int], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        engine(local).submit(prompt, GREEDY)


def test_full_queue_is_refused(local: LocalExecutor) -> None:
    eng = engine(local, max_num_seqs=1, max_waiting=1)
    running = eng.submit(prompts(10)[0], SamplingParams(max_tokens=100, temperature=0.0))
    assert running.events.get(timeout=30).token is not None  # admitted
    waiting = eng.submit(prompts(10)[0], GREEDY)  # no free sequence slot: waits
    with pytest.raises(EngineOverloaded):
        eng.submit(prompts(10)[0], GREEDY)
    eng.abort(running.request_id)
    assert len(waiting.result(timeout=60).token_ids) == 8


class FlakyExecutor(Executor):
    """The local executor, failing the steps numbered in `fail_at` (and recovering like a cluster:
    with every KV cache emptied)."""

    def __init__(self, inner: LocalExecutor, fail_at: set[int], recover_fails: bool = False) -> None:
        self.inner, self.fail_at, self.recover_fails = inner, fail_at, recover_fails
        self.config, self.kv, self.num_replicas = inner.config, inner.kv, 1
        self.calls = 0

    def execute(self, steps: dict[int, ReplicaStep]) -> dict[int, StepResult]:
        self.calls += 1
        if self.calls in self.fail_at or "always" in self.fail_at:
            self.inner.execute(steps)  # half-done work that recovery must throw away
            raise ExecutorFailure(f"injected failure at step call {self.calls}")
        return self.inner.execute(steps)

    def recover(self) -> None:
        if self.recover_fails:
            raise ExecutorFailure("cannot restart")
        self.inner.recover()

    def topology(self) -> list[ActorInfo]:
        return self.inner.topology()

    def stats(self) -> ExecutorStats:
        return self.inner.stats()


def test_failures_resume_with_identical_output(local: LocalExecutor) -> None:
    ps = prompts(7, 50, 150, 3)
    params = [GREEDY, GREEDY, SamplingParams(max_tokens=8, seed=1), SamplingParams(max_tokens=8, seed=2)]
    reference = engine(local).generate(ps, params)
    flaky = FlakyExecutor(local, fail_at={2, 5, 6})
    eng = engine(flaky)
    outs = eng.generate(ps, params, timeout=60)
    assert len(eng.failures) == 3
    for a, b in zip(reference, outs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_kv_cache_full_mid_step_is_recovered_like_a_lost_actor(local: LocalExecutor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The local executor's failures follow the cluster's contract: the step is retried after recovery."""
    eng = engine(local)
    ps = prompts(30, 7)
    reference = eng.generate(ps, GREEDY)
    layers = local.config.num_hidden_layers
    writes = {"n": 0}
    write = KVCache.write

    def full_once(self: KVCache, layer: int, *args: object) -> None:
        writes["n"] += 1
        if writes["n"] == 3 * layers + 2:  # the second layer of the fourth step
            raise KVCacheFull("injected: no free block")
        write(self, layer, *args)

    monkeypatch.setattr(KVCache, "write", full_once)
    outs = eng.generate(ps, GREEDY, timeout=60)
    assert writes["n"] > 3 * layers + 2 and len(eng.failures) == 1
    assert "KVCacheFull" in eng.failures[0][1]
    for a, b in zip(reference, outs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert eng.healthy and eng.load().running == 0
    assert len(eng.generate(ps[:1], GREEDY, timeout=60)[0].token_ids) == 8  # and keeps serving


def test_requests_give_up_after_repeated_failures(local: LocalExecutor) -> None:
    eng = engine(FlakyExecutor(local, fail_at={"always"}), max_attempts=2)  # type: ignore[arg-type]
    with pytest.raises(EngineUnavailable, match="gave up after 3 failures"):
        eng.generate(prompts(5), GREEDY, timeout=60)
    assert eng.healthy  # the engine itself still accepts work


def test_failed_recovery_fails_requests_and_marks_unhealthy(local: LocalExecutor) -> None:
    eng = engine(FlakyExecutor(local, fail_at={1}, recover_fails=True))
    with pytest.raises(EngineUnavailable, match="could not recover"):
        eng.generate(prompts(5), GREEDY, timeout=60)
    assert not eng.healthy
    with pytest.raises(EngineUnavailable):
        eng.submit(prompts(5)[0], GREEDY)


def test_a_failing_consumer_does_not_stop_the_engine(local: LocalExecutor) -> None:
    eng = engine(local)

    def broken_sink(event: object) -> None:
        raise RuntimeError("Event loop is closed")

    eng.submit(prompts(5)[0], GREEDY, sink=broken_sink)
    assert len(eng.generate(prompts(6), GREEDY, timeout=60)[0].token_ids) == 8
    assert eng.healthy


def test_a_short_request_is_not_stuck_behind_a_long_prefill(local: LocalExecutor) -> None:
    """Bound (documented in scheduler.py): a short request's first token comes at the end of the first
    step that starts after it arrives, while a long prompt is still being prefilled."""
    eng = engine(local, max_num_batched_tokens=64)  # long: more than 16 tokens left to prefill
    long = eng.submit(prompts(1200)[0], SamplingParams(max_tokens=2, temperature=0.0))
    while eng.steps < 2:
        time.sleep(0.001)
    arrived_at = eng.steps
    short = eng.submit(prompts(10, seed=3)[0], SamplingParams(max_tokens=1, temperature=0.0))
    assert short.events.get(timeout=60).token is not None
    first_token_at = eng.steps
    assert first_token_at <= arrived_at + 2  # the step running when it arrived, then its own
    assert long.result(timeout=120).token_ids  # and the long prompt still finishes
    assert first_token_at < 1200 // 64  # long before the long prompt's prefill could have ended


def test_requests_with_room_to_run_never_count_as_waiting(local: LocalExecutor) -> None:
    eng = engine(local, max_waiting=4, max_num_seqs=16)
    handles = [eng.submit(prompts(8, seed=i)[0], SamplingParams(max_tokens=4, temperature=0.0)) for i in range(16)]
    assert [len(h.result(timeout=60).token_ids) for h in handles] == [4] * 16  # none refused: all had a slot


def test_penalty_histories_survive_failures(local: LocalExecutor) -> None:
    """A failure empties the replica, penalty histories included: they are rebuilt from the prompt and
    the output the engine sends again, so the continuation is unchanged."""
    params = SamplingParams(max_tokens=24, temperature=0.0, frequency_penalty=2.0, logit_bias=((42, 40.0),))
    ps = prompts(20, 9)
    reference = engine(local).generate(ps, params)
    assert all(o.token_ids.count(42) >= 2 and o.token_ids != [42] * 24 for o in reference)  # the penalty acts
    flaky = engine(FlakyExecutor(local, fail_at={4, 9}))
    assert [o.token_ids for o in flaky.generate(ps, params, timeout=60)] == [o.token_ids for o in reference]
    assert len(flaky.failures) == 2


def test_structured_output_under_failures(local: LocalExecutor, vocab: Path) -> None:
    """A random model under a JSON schema writes JSON that validates; the grammar's state lives in the
    engine beside the tokens, so failures of the executor change nothing."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 100}},
              "required": ["ok", "color", "n"], "additionalProperties": False}
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop_token_ids=(200002,),
                            grammar=grammar.json_schema(schema))
    ps = prompts(12, 30)
    reference = engine(local).generate(ps, params)
    for out in reference:
        assert out.finish_reason == "stop" and out.token_ids[-1] == 200002
        value = json.loads(decode(out.token_ids[:-1]))
        jsonschema.validate(value, schema)
    flaky = engine(FlakyExecutor(local, fail_at={3, 7}))
    assert [o.token_ids for o in flaky.generate(ps, params, timeout=60)] == [o.token_ids for o in reference]
    assert len(flaky.failures) == 2
    with pytest.raises(InvalidRequest, match="grammar"):
        engine(local).submit(ps[0], SamplingParams(grammar='{"grammars": [{"lark_grammar": "start: foo"}]}'))
