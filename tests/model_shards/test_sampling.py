from __future__ import annotations

import pytest
import torch

from model_shards.sampling import SamplingParams, sample, top_p_filter


def tokens(choices) -> list[int]:
    return [c.token for c in choices]


def test_greedy_and_unmodified_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    choices = sample(logits, [SamplingParams(temperature=0.0)] * 2, [0, 0], [0, 0])
    assert tokens(choices) == [1, 0]
    assert [c.logprob for c in choices] == pytest.approx(torch.log_softmax(logits, -1)[[0, 1], [1, 0]].tolist())
    assert choices[0].top == []


def test_logprobs_ignore_temperature_and_bias() -> None:
    logits = torch.tensor([[0.0, 1.0]])
    choice = sample(logits, [SamplingParams(temperature=5.0)], [1], [0])[0]
    assert choice.logprob == pytest.approx(torch.log_softmax(logits, -1)[0, choice.token].item())
    biased = sample(logits, [SamplingParams(temperature=0.0, logit_bias=((0, 5.0),))], [1], [0])[0]
    assert biased.token == 0  # the bias changes the choice ...
    assert biased.logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())  # ... not the reported log-prob


def test_top_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    choice = sample(logits, [SamplingParams(temperature=0.0, top_logprobs=3)], [0], [0])[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert [t for t, _ in choice.top] == [1, 3, 2]
    assert [lp for _, lp in choice.top] == pytest.approx(expected[[1, 3, 2]].tolist())


def test_top_p_keeps_the_smallest_set() -> None:
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert top_p_filter(probs, 0.6).tolist() == pytest.approx([0, 0.625, 0.375, 0])
    assert top_p_filter(probs, 0.01).tolist() == pytest.approx([0, 1, 0, 0])


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.2, 0.8]]))
    draws = [sample(logits, [SamplingParams(temperature=1.0)], [3], [step])[0].token for step in range(2000)]
    assert 0.75 < sum(draws) / len(draws) < 0.85
    low_t = [sample(logits, [SamplingParams(temperature=0.2)], [3], [step])[0].token for step in range(300)]
    assert sum(low_t) / len(low_t) > 0.97


def test_draw_depends_only_on_seed_and_step() -> None:
    logits = torch.randn(1, 1000)
    p = [SamplingParams(temperature=1.0)]
    assert sample(logits, p, [42], [7]) == sample(logits, p, [42], [7])
    assert len({sample(logits, p, [42], [s])[0].token for s in range(20)}) > 5


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"top_logprobs": 21}, {"logit_bias": ((1, 101.0),)}])
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_top_p_below_float32_resolution_keeps_the_most_likely_token() -> None:
    probs = torch.softmax(torch.tensor([1.0, 3.0, 2.0]), dim=-1)
    kept = top_p_filter(probs, 5e-324)  # a valid top_p (> 0) that rounds to 0 in float32
    assert kept.tolist() == [0.0, 1.0, 0.0]
