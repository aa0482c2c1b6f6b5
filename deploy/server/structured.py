"""Structured outputs as the routes take them (`response_format`, the Responses API's `text.format`,
vLLM's `structured_outputs`) -> the grammar text the engine constrains a sequence with
(model_shards/grammar.py). Checked here, so that a schema or grammar that does not compile is a 400
naming the field before anything runs. Chat answers wrap it: the reasoning stays free and the grammar
applies to the final channel."""

from __future__ import annotations

import json
from typing import Any

from deploy.server.protocol import ResponseFormat, StructuredOutputs, check_json_schema
from model_shards import grammar
from model_shards.requests import InvalidRequest


def _schema(value: object, param: str) -> dict[str, object]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidRequest(f"{param} is not valid JSON", param) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{param} must be a JSON schema object", param)
    check_json_schema(value, param)
    return value


def _from_format(fmt: ResponseFormat, param: str) -> str | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return grammar.json_object()
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise InvalidRequest("response_format json_schema needs a `json_schema` with a `schema`", param)
    return grammar.json_schema(_schema(fmt.json_schema.json_schema, f"{param}.json_schema.schema"))


def _from_structured(so: StructuredOutputs) -> tuple[str, str]:
    """(grammar, the field it came from)."""
    given = {name: value for name, value in (("json", so.json_schema), ("regex", so.regex), ("choice", so.choice),
                                            ("grammar", so.grammar), ("json_object", so.json_object or None))
             if value is not None}
    if len(given) != 1:
        raise InvalidRequest("structured_outputs takes exactly one of json, regex, choice, grammar and json_object; "
                             f"got {sorted(given) or 'none'}", "structured_outputs")
    (name, value), = given.items()
    param = f"structured_outputs.{name}"
    if name == "json":
        return grammar.json_schema(_schema(value, param)), param
    if name == "regex":
        return grammar.regex(str(value)), param
    if name == "choice":
        return grammar.choice(list(value)), param  # type: ignore[arg-type]
    if name == "grammar":
        return grammar.lark(str(value)), param
    return grammar.json_object(), param


def tool_call_grammar(tools: list[tuple[str, dict[str, Any] | None]], choice: str | None) -> str | None:
    """The grammar of a forced call: tool_choice "required" (any of `tools`, (name, parameters schema)
    each) or a function's name; None for "auto", "none" or no choice. The schemas were checked with
    the request; a call's arguments follow its schema (any JSON object where it has none)."""
    if choice in (None, "auto", "none"):
        return None
    chosen = tools if choice == "required" else [t for t in tools if t[0] == choice]
    if not chosen:
        raise InvalidRequest(f"tool_choice names the function {choice!r}, which is not among the tools", "tool_choice")
    try:
        text = grammar.harmony_tool_call([(name, grammar.json_schema(params) if params else None)
                                          for name, params in chosen])
        grammar.check(text)
    except grammar.GrammarError as exc:
        raise InvalidRequest(f"the tools' parameters cannot be used to constrain a call: {exc}", "tools") from None
    return text


def answer_grammar(fmt: ResponseFormat | None, so: StructuredOutputs | None, chat: bool,
                   format_param: str = "response_format") -> str | None:
    """The checked grammar for a request's answer, or None when it is free. `chat`: the output is a
    harmony answer (reasoning, then the final channel under the grammar)."""
    constrained = _from_format(fmt, format_param) if fmt is not None else None
    param = format_param
    if so is not None:
        if constrained is not None:
            raise InvalidRequest(f"give {format_param} or structured_outputs, not both", "structured_outputs")
        try:
            constrained, param = _from_structured(so)
        except grammar.GrammarError as exc:
            raise InvalidRequest(str(exc), "structured_outputs") from None
    if constrained is None:
        return None
    text = grammar.harmony_final(constrained) if chat else constrained
    try:
        grammar.check(text)
    except grammar.GrammarError as exc:
        raise InvalidRequest(f"{param} cannot be used to constrain the output: {exc}", param) from None
    return text
