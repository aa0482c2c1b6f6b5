from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_shards.batch import SeqChunk, plan_step
from model_shards.generate import InvalidRequest, Request, generate
from model_shards.kv_cache import KVCacheFull
from model_shards.loader import load_local_model
from model_shards.model import GptOssModel
from model_shards.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_hf: Path) -> GptOssModel:
    return load_local_model(str(tiny_hf), torch.float32)


def _prompts(*lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 199_998, (n,), generator=gen).tolist() for n in lengths]


def test_batched_equals_one_at_a_time(model: GptOssModel) -> None:
    prompts = _prompts(5, 140, 300)  # shorter than, longer than, and over twice the window
    together = generate(model, [Request(p, GREEDY) for p in prompts])
    for prompt, batched in zip(prompts, together):
        alone = generate(model, [Request(prompt, GREEDY)])[0]
        assert batched.token_ids == alone.token_ids
        assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_chunked_prefill_equals_whole_prefill(model: GptOssModel) -> None:
    prompts = _prompts(300, 37)
    whole = generate(model, [Request(p, GREEDY) for p in prompts])
    chunked = generate(model, [Request(p, GREEDY) for p in prompts], max_step_tokens=50)
    for a, b in zip(whole, chunked):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("split", [[300], [200, 100], [100, 150, 50], [127, 1, 172]])
def test_cache_splits_give_the_same_logits(model: GptOssModel, split: list[int]) -> None:
    ids = _prompts(300)[0]
    kv = model.new_cache(num_blocks=32, max_seqs=1)
    kv.reserve(0, 300)
    start = 0
    for n in split:
        logits = model.forward(torch.tensor(ids[start:start + n]), plan_step([SeqChunk(0, start, n)]), kv)
        start += n
    kv_ref = model.new_cache(num_blocks=32, max_seqs=1)
    kv_ref.reserve(0, 300)
    reference = model.forward(torch.tensor(ids), plan_step([SeqChunk(0, 0, 300)]), kv_ref)
    assert torch.allclose(logits, reference, atol=1e-4)


def test_stop_tokens_end_a_sequence(model: GptOssModel) -> None:
    first = generate(model, [Request(_prompts(10)[0], GREEDY)])[0]
    stop_at = first.token_ids[2]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(stop_at,))
    stopped = generate(model, [Request(_prompts(10)[0], params)])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[:first.token_ids.index(stop_at) + 1]
    assert first.finish_reason == "length" and len(first.token_ids) == 8


def test_seeded_sampling_is_reproducible_and_batch_independent(model: GptOssModel) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=5)
    p1, p2 = _prompts(12, 30)
    alone = generate(model, [Request(p1, params)])[0]
    again = generate(model, [Request(p2, SamplingParams(max_tokens=8, seed=9)), Request(p1, params)])[1]
    assert alone.token_ids == again.token_ids
    other = generate(model, [Request(p1, SamplingParams(max_tokens=8, temperature=1.0, seed=6))])[0]
    assert other.token_ids != alone.token_ids


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([5, 201088], "outside the vocabulary"),
    ([-1], "outside the vocabulary"),
])
def test_invalid_requests(model: GptOssModel, prompt: list[int], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        generate(model, [Request(prompt, GREEDY)])


def test_too_long_for_the_context(model: GptOssModel) -> None:
    with pytest.raises(InvalidRequest, match="exceeds the context length"):
        generate(model, [Request([1, 2], SamplingParams(max_tokens=model.config.max_position_embeddings))])


def test_kv_cache_accounting(model: GptOssModel) -> None:
    kv = model.new_cache(num_blocks=4, max_seqs=2, block_size=16)
    kv.reserve(0, 40)  # 3 blocks
    assert kv.usage() == pytest.approx(0.75)
    assert not kv.can_reserve(1, 20)
    with pytest.raises(KVCacheFull):
        kv.reserve(1, 20)
    assert kv.free_blocks == 1 and not kv.holds(1)  # a failed reservation takes nothing
    kv.free(0)
    assert kv.usage() == 0.0 and kv.can_reserve(1, 64)
    with pytest.raises(KVCacheFull, match="no KV reserved"):
        kv.view(plan_step([SeqChunk(7, 0, 3)]))
