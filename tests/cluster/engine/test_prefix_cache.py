"""Automatic prefix caching in the engine (local executor, float32): reused KV gives the tokens and
log-probs of a full prefill, shared blocks outlive one of their users, and memory pressure evicts
cached blocks instead of refusing work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.config import EngineConfig, KVSpec, ModelSource
from cluster.engine.engine import Engine
from cluster.engine.executor import LocalExecutor
from model_shards.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
KV = KVSpec(num_blocks=256, block_size=16, max_seqs=8)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 199_998, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def local(tiny_hf: Path) -> LocalExecutor:
    return LocalExecutor(ModelSource(str(tiny_hf), "float32"), KV)


def engine(executor: LocalExecutor, caching: bool = True, **config: int) -> Engine:
    executor.recover()  # an empty cache for every test
    return Engine(executor, EngineConfig(engine="local", prefix_caching=caching, **config))


def test_a_shared_prefix_longer_than_the_window_is_reused_exactly(local: LocalExecutor) -> None:
    prefix = tokens(700, 1)
    first, second = prefix + tokens(20, 2), prefix + tokens(30, 3)
    reference = engine(local, caching=False).generate([second], GREEDY)[0]
    eng = engine(local)
    assert eng.generate([first], GREEDY)[0].cached_tokens == 0
    out = eng.generate([second], GREEDY)[0]
    assert out.cached_tokens == 688  # every whole block of the 700 shared tokens (43 x 16)
    assert out.token_ids == reference.token_ids
    assert max(abs(a - b) for a, b in zip(out.logprobs, reference.logprobs)) < 1e-4
    load = eng.load()
    assert load.prefix_hits == 688 and load.prefix_queries == len(first) + len(second)
    assert load.kv_usage == 0 and load.kv_cached_share > 0  # nothing running; the prefixes stay cached


def test_an_identical_prompt_computes_only_its_last_token(local: LocalExecutor) -> None:
    prompt = tokens(64, 4)
    eng = engine(local)
    first = eng.generate([prompt], GREEDY)[0]
    again = eng.generate([prompt], GREEDY)[0]
    assert again.cached_tokens == 48  # 64 would leave nothing to compute the first token's logits from
    assert again.token_ids == first.token_ids


def test_blocks_shared_by_running_requests_survive_the_abort_of_one(local: LocalExecutor) -> None:
    prefix = tokens(320, 5)
    alone = engine(local, caching=False).generate([prefix + [11, 12]], SamplingParams(max_tokens=30,
                                                                                      temperature=0.0))[0]
    eng = engine(local)
    eng.generate([prefix + [9]], SamplingParams(max_tokens=1, temperature=0.0))  # caches the prefix
    doomed = eng.submit(prefix + [10], SamplingParams(max_tokens=200, temperature=0.0))
    keeper = eng.submit(prefix + [11, 12], SamplingParams(max_tokens=30, temperature=0.0))
    first = keeper.events.get(timeout=60).token
    assert doomed.events.get(timeout=60).token is not None and first is not None
    with eng._lock:  # both hold the prefix's 20 blocks once
        kv = eng.scheduler.replicas[0]
        a, b = (kv.seqs[s.seq_id].full for s in eng.scheduler.admitted)
        assert a[:20] == b[:20]
        assert eng.scheduler.kv_usage() == len(set(a) | set(b)) / KV.num_blocks
    eng.abort(doomed.request_id)
    out = keeper.result(timeout=60)
    assert [first] + out.token_ids == alone.token_ids
    assert out.cached_tokens == 320


def test_memory_pressure_evicts_cached_blocks_and_admission_goes_on(tiny_hf: Path) -> None:
    small = LocalExecutor(ModelSource(str(tiny_hf), "float32"), KVSpec(num_blocks=48, block_size=16, max_seqs=4))
    eng = engine(small)
    prompts = [tokens(400, 10 + i) for i in range(4)]  # 26 blocks each (with 8 outputs): one at a time fits
    outs = [eng.generate([p], GREEDY, timeout=120)[0] for p in prompts]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert eng.generate([prompts[0]], GREEDY)[0].cached_tokens == 0  # the first prefix was evicted
    assert eng.generate([prompts[0]], GREEDY)[0].cached_tokens == 384  # and is cached again
    reference = engine(small, caching=False).generate(prompts, GREEDY, timeout=120)
    assert [o.token_ids for o in outs] == [r.token_ids for r in reference]


def test_choices_of_one_prompt_share_its_blocks_and_keep_their_seeds(local: LocalExecutor) -> None:
    prompt = tokens(200, 6)
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=40 + i) for i in range(3)]
    alone = [engine(local, caching=False).generate([prompt], p)[0] for p in params]
    eng = engine(local)
    first = eng.submit(prompt, params[0])
    rest = [eng.submit(prompt, p, leader=first.request_id) for p in params[1:]]
    outs = [h.result(timeout=60) for h in [first, *rest]]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert [o.cached_tokens for o in outs] == [0, 192, 192]
