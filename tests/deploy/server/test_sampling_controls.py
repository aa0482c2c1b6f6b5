"""Penalties, top_k, min_p and min_tokens through the openai SDK (in process, local engine)."""

from __future__ import annotations

import pytest

from tests.deploy.conftest import MODEL

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK
PROMPT = [1000, 2000, 3000, 4000, 5000]




def tokens(sdk, **extra: object) -> list[int]:
    body = extra.pop("body", {})
    out = sdk.completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, **extra},
                                 extra_body={"return_token_ids": True, "ignore_eos": True, **body})
    return out.choices[0].model_extra["token_ids"]


def test_penalties_change_greedy_output_reproducibly(sdk) -> None:
    # A strong bias makes token 42 win every step unless a penalty that grows with repeats (frequency)
    # pushes it back; a weaker one lets 42 win only now and then, and repetition scales it down.
    for bias, extra in ((40, {"frequency_penalty": 2.0}), (16, {"body": {"repetition_penalty": 2.0}})):
        plain = tokens(sdk, logit_bias={"42": bias})
        assert plain.count(42) >= 2, plain
        penalized = tokens(sdk, logit_bias={"42": bias}, **extra)
        assert penalized != plain and penalized[0] == plain[0], extra  # equal until the first repeat
        assert tokens(sdk, logit_bias={"42": bias}, **extra) == penalized  # reproducible


def test_top_k_one_is_greedy_and_min_p_one_too(sdk) -> None:
    greedy = tokens(sdk)
    assert tokens(sdk, temperature=1.5, seed=3, body={"top_k": 1}) == greedy
    assert tokens(sdk, temperature=1.5, seed=3, body={"min_p": 1.0}) == greedy
    assert tokens(sdk, temperature=1.5, seed=3) != greedy


def test_min_tokens_keeps_stop_tokens_out(sdk) -> None:
    text = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logit_bias={"199999": 100}, extra_body={"return_token_ids": True})  # EOS at once
    assert text.choices[0].model_extra["token_ids"] == [199999] and text.choices[0].finish_reason == "stop"
    held = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={"199999": 100},
                                  extra_body={"return_token_ids": True, "min_tokens": 4})
    ids = held.choices[0].model_extra["token_ids"]
    assert 199999 not in ids[:4] and ids[4] == 199999 and held.choices[0].finish_reason == "stop"


def test_chat_takes_the_same_controls(sdk) -> None:
    def content(**extra: object) -> str | None:
        out = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
                                          temperature=0, **extra)
        return (out.choices[0].message.content or "") + (getattr(out.choices[0].message, "reasoning", None) or "")

    assert content(logit_bias={"42": 40}, frequency_penalty=2.0) != content(logit_bias={"42": 40})
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        content(extra_body={"min_tokens": 50})  # more than max_tokens
