"""Structured outputs: grammars that constrain what a sequence may generate, and the per-token masks
they give, through llguidance.

Why llguidance and not xgrammar, by the per-token mask cost at o200k_harmony's 201,088 tokens
(`python cluster/bench/scripts/bench-grammar-masks.py`; numbers in docs/measurements.md): llguidance
is somewhat faster on string content and several times slower on pure structure (booleans, enums,
bounded integers, arrays), and a little faster over whole answers, which are mostly string content.
Either cost is far under one decode step and under applying the mask to the row of logits (the same
for both). What decides beyond that: llguidance compiles a schema in a fraction of xgrammar's time
(every new schema pays it before its request can start), and llguidance is one 8 MB wheel with no
dependencies, where xgrammar requires torch, transformers and on Linux triton (about 1 GB).

A grammar travels as text (llguidance's JSON form of a top-level grammar), so that it can be checked
where the request arrives and rebuilt from the text and a sequence's tokens anywhere. Chat answers
use `harmony_final`: the reasoning stays free text, and the grammar applies to the final channel.
JSON is compact (no whitespace between tokens, "," and ":" as separators) so that a model cannot
loop on whitespace. Once a grammar is complete only stop tokens are allowed.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import torch

from model_shards.token_mask import bits_of
from model_shards.tokenizer import RETURN, tokenizer

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# The reasoning (analysis) messages are free; the answer is the final channel's message.
HARMONY_ANALYSIS = r'analysis: <|channel|> "analysis" <|message|> /(.|\n)*/ <|end|> <|start|> "assistant"'
HARMONY_FINAL = "\nstart: analysis* <|channel|> \"final\" <|message|> @answer\n" + HARMONY_ANALYSIS + "\n"


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled (the message says why)."""


@functools.cache
def _tokenizer() -> Any:
    """llguidance's view of o200k_harmony (costly to build, so built once per process: docs/measurements.md)."""
    from llguidance.tiktoken import lltokenizer_from_encoding

    return lltokenizer_from_encoding(tokenizer(), eos_token=RETURN)


def _llguidance() -> Any:
    import llguidance

    return llguidance


def _top(grammar: dict[str, Any]) -> str:
    return json.dumps({"grammars": [grammar]})


def _only(top_level: str) -> dict[str, Any]:
    """The single grammar inside a top-level grammar's text."""
    grammars = json.loads(top_level)["grammars"]
    assert len(grammars) == 1
    return dict(grammars[0])


def json_schema(schema: dict[str, Any]) -> str:
    """Compact JSON that validates against `schema`."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    return _top({"json_schema": {**schema, "x-guidance": {**COMPACT_JSON, **schema.get("x-guidance", {})}}})


def json_object() -> str:
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


def choice(options: Sequence[str]) -> str:
    """Exactly one of `options`."""
    if not options or not all(isinstance(o, str) and o for o in options):
        raise GrammarError("choice needs a non-empty list of non-empty strings")
    return _top({"lark_grammar": "start: " + " | ".join(json.dumps(o) for o in options)})


def lark(text: str) -> str:
    """A grammar in llguidance's Lark syntax, or in GBNF (llama.cpp's, recognized by `::=`)."""
    if "::=" in text:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except Exception as exc:  # the converter raises plain exceptions on bad input
            raise GrammarError(f"invalid GBNF grammar: {exc}") from None
    return _top({"lark_grammar": text})


def harmony_final(answer: str) -> str:
    """A chat answer whose final channel follows `answer` (any of the above); reasoning is free."""
    inner = _only(answer)
    inner["name"] = "answer"
    return json.dumps({"grammars": [{"lark_grammar": HARMONY_FINAL}, inner]})


def harmony_tool_call(calls: Sequence[tuple[str, str | None]]) -> str:
    """A chat answer that is one call of one of `calls` ((function name, grammar of its arguments or
    None for any JSON object)): free reasoning first, then a commentary message to functions.NAME with
    `<|constrain|>json` whose text follows that function's arguments grammar. The recipient may stand
    in the role (`<|start|>assistant to=functions.NAME<|channel|>commentary`, as harmony renders
    history) or after the channel (`<|channel|>commentary to=functions.NAME`, as the models write it)."""
    if not calls:
        raise GrammarError("a forced tool call needs at least one function")
    rules, grammars = [], [{"lark_grammar": ""}]
    for i, (name, arguments) in enumerate(calls):
        recipient = json.dumps(f" to=functions.{name}")
        channel = json.dumps(f"commentary to=functions.{name}")
        rules.append(f"call_{i}: ({recipient} <|channel|> \"commentary\" | <|channel|> {channel}) \" \"? "
                     f"<|constrain|> \"json\" <|message|> @args_{i}")
        inner = _only(arguments if arguments is not None else json_object())
        inner["name"] = f"args_{i}"
        grammars.append(inner)
    start = "start: analysis* (" + " | ".join(f"call_{i}" for i in range(len(calls))) + ")"
    grammars[0]["lark_grammar"] = "\n".join([start, HARMONY_ANALYSIS, *rules])
    return json.dumps({"grammars": grammars})


def check(grammar: str) -> None:
    """GrammarError with llguidance's reason when `grammar` does not compile (whatever llguidance
    raises on the way is a reason too: the request is what it could not handle)."""
    try:
        error = _llguidance().LLMatcher.validate_grammar(grammar, _tokenizer())
    except (ValueError, TypeError, RecursionError, RuntimeError) as exc:
        raise GrammarError(f"{type(exc).__name__}: {exc}"[:500]) from None
    if error:
        raise GrammarError(_reason(error))


def _reason(error: str) -> str:
    """llguidance's message on one line (it may quote the grammar over several)."""
    return " ".join(line.strip() for line in error.splitlines() if line.strip())[:500]


class Constraint:
    """One sequence's grammar state: built from the grammar and the tokens generated so far (so it can
    be rebuilt from them at any time), advanced by each sampled token, asked for the next token's mask.
    A token the grammar refuses (it cannot be sampled under the mask; only an outside change could)
    ends the constraint's choices: from then on only stop tokens are allowed."""

    def __init__(self, grammar: str, tokens: Sequence[int] = ()) -> None:
        try:
            self._matcher = _llguidance().LLMatcher(_tokenizer(), grammar)
        except (ValueError, TypeError, RecursionError, RuntimeError) as exc:
            raise GrammarError(f"{type(exc).__name__}: {exc}"[:500]) from None
        if self._matcher.is_error():
            raise GrammarError(_reason(self._matcher.get_error()))
        self.broken = False
        for token in tokens:
            self.advance(token)

    def advance(self, token: int) -> None:
        if not self.broken and not self._matcher.consume_token(token):
            self.broken = True

    @property
    def done(self) -> bool:
        """Nothing but a stop token can follow."""
        return self.broken or self._matcher.is_stopped()

    def mask(self, stop_tokens: Sequence[int], stops_allowed: bool = True) -> torch.Tensor:
        """[W] int32 bit words (bit t of word t // 32: token t is allowed) for the next token. Where the
        grammar is complete, exactly the sequence's stop tokens; `stops_allowed=False` (min_tokens not
        reached) keeps them out while the grammar still has other choices."""
        stops = list(stop_tokens) or [RETURN]
        if self.done:
            return _stop_bits(tuple(stops), _tokenizer().vocab_size)
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        stop_bits = _stop_bits(tuple(stops), words.numel() * 32)
        if self._matcher.is_accepting() and stops_allowed:  # the grammar may end here: so may any stop token
            return words | stop_bits
        return words & ~stop_bits  # (llguidance's own end-of-sequence token included)


@functools.lru_cache(maxsize=64)
def _stop_bits(tokens: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    return bits_of(tokens, vocab_size)
