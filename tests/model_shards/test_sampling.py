from __future__ import annotations

import pytest
import torch

from model_shards.draw import keep_top_p
from model_shards.sampling import SamplingParams, sample


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
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [1.0, 5.0, 3.0, 1.0], [0.1, 0.5, 0.3, 0.1]])  # any total
    kept = keep_top_p(probs, [0.6, 0.6, 0.01])
    assert kept.tolist() == [pytest.approx([0, 0.5, 0.3, 0]), [0, 5, 3, 0], pytest.approx([0, 0.5, 0, 0])]
    assert torch.equal(keep_top_p(probs, [1.0, 1.0, 1.0]), probs)
    assert keep_top_p(probs, [0.6, 1.0, 0.01], head=2).tolist() == [pytest.approx([0, 0.5, 0.3, 0]),
                                                                    [1, 5, 3, 1], pytest.approx([0, 0.5, 0, 0])]
    wide = torch.tensor([[0.3, 0.2, 0.25, 0.25]])  # the two most likely hold 0.55: whole rows get sorted
    assert keep_top_p(wide, [0.7], head=2).tolist() == [pytest.approx([0.3, 0, 0.25, 0.25])]


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
    probs = torch.softmax(torch.tensor([[1.0, 3.0, 2.0]]), dim=-1)
    kept = keep_top_p(probs, [5e-324])  # a valid top_p (> 0) that rounds to 0 in float32
    assert kept[0].tolist() == [0.0, probs[0, 1].item(), 0.0]


def test_penalties_follow_openai_and_vllm() -> None:
    from model_shards.logits import History

    logits = torch.tensor([[4.0, 3.5, 3.0, -1.0, 0.0]])
    history = History(prompt=[3], out=[0, 0, 1])  # token 0 twice, token 1 once; token 3 only in the prompt
    greedy = SamplingParams(temperature=0.0, top_logprobs=5)

    def choose(row: list[float] | None = None, **penalties: float) -> int:
        params = SamplingParams(temperature=0.0, **penalties)
        values = logits if row is None else torch.tensor([row])
        return sample(values, [params], [0], [3], histories=[History([3], [0, 0, 1])])[0].token

    assert choose() == 0
    assert choose(presence_penalty=0.6) == 0  # once per token: 4 - 0.6 = 3.4 still leads
    assert choose(frequency_penalty=0.6) == 2  # per occurrence: 4 - 1.2 = 2.8, 3.5 - 0.6 = 2.9 < 3.0
    assert choose(presence_penalty=1.5) == 2  # 2.5, 2.0 < 3.0
    assert choose(repetition_penalty=2.0) == 2  # 4 / 2 = 2, 3.5 / 2 = 1.75 < 3.0
    assert choose([0.0, 0.0, 0.0, 5.0, 4.0], repetition_penalty=2.0) == 4  # the prompt's token 3 counts too
    choice = sample(logits, [greedy], [0], [3], histories=[history])[0]
    assert choice.token == 0 and history.counts[0] == 3  # the chosen token joins the history
    assert choice.logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())  # unmodified log-probs


def test_min_tokens_top_k_and_min_p() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    stop = SamplingParams(temperature=0.0, stop_token_ids=(0,), min_tokens=2, max_tokens=4)
    assert sample(logits, [stop], [0], [1])[0].token == 1  # the stop token waits for min_tokens
    assert sample(logits, [stop], [0], [2])[0].token == 0
    for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, min_p=0.9)):
        assert {sample(logits, [params], [seed], [0])[0].token for seed in range(20)} == {0}
    assert len({sample(logits, [SamplingParams(temperature=5.0)], [seed], [0])[0].token for seed in range(40)}) > 1


def test_a_row_with_nothing_to_draw_from_keeps_its_greedy_choice() -> None:
    """One request's degenerate distribution must not fail the step of the whole batch."""
    logits = torch.randn(2, 64)
    logits[0] = float("-inf")
    logits[0, 5] = float("inf")  # softmax of it is nan
    params = [SamplingParams(temperature=0.7, seed=1, logprobs=False)] * 2
    choices = sample(logits, params, [1, 1], [0, 0])
    assert choices[0].token == 5 and 0 <= choices[1].token < 64


def test_greedy_rows_without_logprobs_take_the_argmax_of_model_dtype_logits() -> None:
    """The fast path (no fp32 copy) chooses what the full path chooses, ties included, and still
    records each choice in the penalty histories."""
    from model_shards.logits import History

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 1000, generator=gen) * 4).bfloat16()
    logits[2, 10] = logits[2, 500] = 99.0  # a tie: the first index wins on both paths
    fast = SamplingParams(max_tokens=4, temperature=0.0, logprobs=False)
    full = SamplingParams(max_tokens=4, temperature=0.0, logprobs=True)
    histories = [History([], []) for _ in range(6)]
    got = sample(logits, [fast] * 6, [0] * 6, [0] * 6, histories=histories)
    want = sample(logits.float(), [full] * 6, [0] * 6, [0] * 6)
    assert [c.token for c in got] == [c.token for c in want] == logits.float().argmax(-1).tolist()
    assert got[2].token == 10 and all(c.logprob is None and c.top == [] for c in got)
    assert [h.counts for h in histories] == [{c.token: 1} for c in got]


def test_argmax_rows_equals_max_indices_with_ties_and_a_partial_last_block() -> None:
    from model_shards.draw import argmax_rows

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 1000, generator=gen).bfloat16()  # block 64: 15 whole blocks and 40 columns
    logits[0, 990] = 9.0  # the maximum in the partial block
    logits[1, 70] = logits[1, 3] = 9.0  # a tie across blocks: the first wins
    logits[2, 64] = logits[2, 65] = 9.0  # a tie within a block
    logits[3, 999] = 9.0  # the very last column
    logits[4] = 0.0  # every column ties
    for block in (64, 1000, 4096):
        got = argmax_rows(logits, block)
        assert got.tolist() == logits.max(dim=-1).indices.tolist()
        assert got[:5].tolist() == [990, 3, 64, 999, 0]
