"""The datasets of `gptoss bench serve`: ShareGPT turns and lengths, random lengths within the range
ratio, repeated prefixes, a text file of prompts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.bench.datasets import DatasetConfig, load_requests

SAMPLE = Path(__file__).parent / "data" / "sharegpt-sample.json"
USABLE = {  # the first human turn and its reply, of the conversations that pass vLLM's filter
    "What is the capital of France, and why did it become the capital?":
        "Paris is the capital of France. It became the capital because the Capetian kings ruled from there and it "
        "grew into the centre of trade, learning and government.",
    "Write a haiku about the sea at night, please.":
        "Dark water breathing / the moon unrolls a silver road / gulls asleep on waves",
    "Name three prime numbers larger than one hundred.":
        "101, 103 and 107 are prime numbers larger than one hundred.",
}


def test_the_sharegpt_sample_loads_with_our_tokenizers_lengths(vocab: Path) -> None:
    from model_shards.tokenizer import encode

    requests = load_requests(DatasetConfig("sharegpt", str(SAMPLE), num_prompts=3), lambda t: len(encode(t)))
    # "Hi" is under 4 tokens and a conversation without a reply has no exchange: both are left out.
    assert {r.prompt for r in requests} == set(USABLE)
    for r in requests:
        assert r.prompt_len == len(encode(r.prompt)) and r.output_len == len(encode(USABLE[r.prompt]))
    assert [r.prompt_len for r in requests] != [None] * 3


def test_sharegpt_is_seeded_reused_when_short_and_can_fix_the_output_length() -> None:
    words = lambda text: len(text.split())  # noqa: E731 - a stand-in tokenizer
    once = load_requests(DatasetConfig("sharegpt", str(SAMPLE), num_prompts=7, seed=3), words)
    again = load_requests(DatasetConfig("sharegpt", str(SAMPLE), num_prompts=7, seed=3), words)
    assert len(once) == 7 and once == again
    assert once[:3] == once[3:6] and {r.prompt for r in once} == set(USABLE)
    fixed = load_requests(DatasetConfig("sharegpt", str(SAMPLE), num_prompts=3, sharegpt_output_len=32), words)
    assert {r.output_len for r in fixed} == {32}
    with pytest.raises(ValueError, match="needs the tokenizer"):
        load_requests(DatasetConfig("sharegpt", str(SAMPLE)))
    with pytest.raises(ValueError, match="needs --dataset-path"):
        load_requests(DatasetConfig("sharegpt"), words)


def test_random_lengths_stay_within_the_range_ratio_and_fixed_lengths_are_exact() -> None:
    spread = load_requests(DatasetConfig(num_prompts=200, input_len=100, output_len=40, range_ratio=0.5, seed=1))
    assert {len(r.prompt) for r in spread} <= set(range(50, 151)) and len({len(r.prompt) for r in spread}) > 20
    assert {r.output_len for r in spread} <= set(range(20, 61)) and all(r.prompt_len == len(r.prompt) for r in spread)
    fixed = load_requests(DatasetConfig(num_prompts=5, input_len=16, output_len=8, shared_prefix=4))
    assert all(len(r.prompt) == 20 and r.output_len == 8 for r in fixed)
    assert len({tuple(r.prompt[:4]) for r in fixed}) == 1
    with pytest.raises(ValueError):
        load_requests(DatasetConfig(range_ratio=1.0))


def test_prefix_repetition_reuses_each_prefix_equally() -> None:
    requests = load_requests(DatasetConfig("prefix-repetition", num_prompts=12, input_len=5, shared_prefix=8,
                                           num_prefixes=3))
    prefixes = [tuple(r.prompt[:8]) for r in requests]
    assert len(set(prefixes)) == 3 and all(prefixes.count(p) == 4 for p in set(prefixes))
    assert len({tuple(r.prompt) for r in requests}) == 12 and all(r.prompt_len == 13 for r in requests)
    assert prefixes[:4] != [prefixes[0]] * 4 or prefixes[4:8] != [prefixes[4]] * 4  # shuffled, not in runs
    with pytest.raises(ValueError, match="--shared-prefix"):
        load_requests(DatasetConfig("prefix-repetition"))


def test_a_text_file_gives_one_prompt_a_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\n\nsecond one here\n", encoding="utf-8")
    requests = load_requests(DatasetConfig("text", str(path), num_prompts=3, output_len=9), lambda t: len(t.split()))
    assert [(r.prompt, r.prompt_len, r.output_len) for r in requests] == [
        ("first prompt", 2, 9), ("second one here", 3, 9), ("first prompt", 2, 9)]
