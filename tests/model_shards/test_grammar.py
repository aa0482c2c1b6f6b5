"""Structured-output grammars (llguidance): what they accept, compact JSON, the chat wrapper that
leaves reasoning free, masks that allow only stop tokens once complete, and the packed bit words."""

from __future__ import annotations

import json

import pytest
import torch

from model_shards import grammar, token_mask
from model_shards.tokenizer import CALL, END, RETURN, encode

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["ok", "color", "n"], "additionalProperties": False}
STOPS = (RETURN, CALL)


def accepts(text: str, tokens: list[int]) -> bool:
    c = grammar.Constraint(text)
    for t in tokens:
        c.advance(t)
    return not c.broken


def allowed_ids(words: torch.Tensor) -> list[int]:
    return torch.nonzero(token_mask.allowed(words, 201088)).view(-1).tolist()


@pytest.fixture(autouse=True)
def _vocab(vocab) -> None:  # the o200k vocabulary (tests/conftest.py points tiktoken at it)
    pass


def test_json_schema_is_compact_and_bounded() -> None:
    g = grammar.json_schema(SCHEMA)
    grammar.check(g)
    assert accepts(g, encode('{"ok":true,"color":"red","n":42}'))
    assert not accepts(g, encode('{"ok": true,"color":"red","n":42}'))  # no whitespace
    assert not accepts(g, encode('{"ok":true,"color":"red","n":420}'))  # beyond the maximum
    assert not accepts(g, encode('{"ok":true,"color":"blue","n":4}'))  # not in the enum


def test_chat_wrapper_leaves_reasoning_free_and_constrains_the_final_channel() -> None:
    g = grammar.harmony_final(grammar.json_schema(SCHEMA))
    grammar.check(g)
    answer = '<|channel|>final<|message|>{"ok":false,"color":"green","n":7}'
    free = '<|channel|>analysis<|message|>Anything { goes here: "n": 420\n<|end|><|start|>assistant'
    assert accepts(g, encode(answer)) and accepts(g, encode(free + answer))
    assert not accepts(g, encode('<|channel|>final<|message|>hello'))
    assert not accepts(g, encode('<|channel|>commentary<|message|>{}'))


def test_complete_grammar_allows_only_stop_tokens() -> None:
    c = grammar.Constraint(grammar.harmony_final(grammar.json_schema(SCHEMA)),
                           encode('<|channel|>final<|message|>{"ok":true,"color":"red","n":42}'))
    assert c.done and allowed_ids(c.mask(STOPS)) == sorted(STOPS)
    c = grammar.Constraint(grammar.json_schema(SCHEMA), encode('{"ok":true,"color":"red","n":4'))
    mask = allowed_ids(c.mask(STOPS))  # "4" may go on ("42") or end the number, never the object early
    assert encode("}")[0] in mask and RETURN not in mask and END not in mask


def test_regex_and_min_tokens_keep_stops_out_until_allowed() -> None:
    c = grammar.Constraint(grammar.regex(r"\d+"), encode("12"))
    assert RETURN in allowed_ids(c.mask(STOPS)) and CALL in allowed_ids(c.mask(STOPS))
    assert not set(STOPS) & set(allowed_ids(c.mask(STOPS, stops_allowed=False)))


def test_choice_quotes_any_text() -> None:
    options = ["yes", 'no "way"', "back\\slash", "ünïcödé"]
    g = grammar.choice(options)
    grammar.check(g)
    for o in options:
        assert accepts(g, encode(o))
    assert not accepts(g, encode("maybe"))


def test_bad_schemas_regexes_and_grammars_say_why() -> None:
    with pytest.raises(grammar.GrammarError, match="frobnicate"):
        grammar.check(grammar.json_schema({"type": "frobnicate"}))
    with pytest.raises(grammar.GrammarError, match="unclosed"):
        grammar.check(grammar.regex("(unclosed"))
    with pytest.raises(grammar.GrammarError, match="foo"):
        grammar.check(grammar.lark("start: foo"))
    gbnf = grammar.lark('root ::= "a" | "b"')  # GBNF is converted to Lark
    grammar.check(gbnf)
    assert accepts(gbnf, encode("b"))


def test_a_refused_token_leaves_only_stop_tokens() -> None:
    c = grammar.Constraint(grammar.json_schema(SCHEMA))
    c.advance(encode("hello")[0])
    assert c.broken and c.done and allowed_ids(c.mask(STOPS)) == sorted(STOPS)


def test_bit_words_round_trip_and_mask_rows() -> None:
    ids = [0, 31, 32, 63, 200002, 201087]
    words = token_mask.bits_of(ids, 201088)
    assert words.dtype == torch.int32 and words.numel() == 201088 // 32
    assert allowed_ids(words) == ids
    row = torch.zeros(201088)
    token_mask.apply_mask(row, words)
    assert torch.isfinite(row).nonzero().view(-1).tolist() == ids


def test_schema_grammar_is_json_text() -> None:
    text = grammar.harmony_final(grammar.choice(["a", "b"]))
    assert [g.get("name") for g in json.loads(text)["grammars"]] == [None, "answer"]
