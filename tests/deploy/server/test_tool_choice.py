"""Forced tool calls through the grammar (tool_choice "required" or a named function), on chat
(streamed and not) and on /v1/responses, through the openai SDK in process over a random-weight model:
the answer is a call of an allowed function whose arguments validate against its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from model_shards.tokenizer import encode
from tests.deploy.conftest import MODEL

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK

# Every value bounded, so that a random model's arguments end within a few tokens.
PICK = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                         "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["color", "count"], "additionalProperties": False}
TOGGLE = {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"],
          "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "pick_color", "description": "Pick.", "parameters": PICK}},
         {"type": "function", "function": {"name": "toggle", "parameters": TOGGLE}}]
SCHEMAS = {"pick_color": PICK, "toggle": TOGGLE}
MESSAGES = [{"role": "user", "content": "Pick a color."}]




@pytest.fixture(scope="module")
def call_now(vocab) -> dict[str, int]:
    # A random model almost never ends its reasoning; favouring "commentary" opens the call at once
    # (the grammar then writes the recipient and holds the arguments to the schema).
    return {str(encode("commentary")[0]): 30}


def assert_valid(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("choice, allowed", [
    ("required", {"pick_color", "toggle"}),
    ({"type": "function", "function": {"name": "toggle"}}, {"toggle"}),
])
def test_chat_forced_call(sdk, call_now, choice, allowed: set[str]) -> None:
    for seed in range(3):
        out = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                          max_tokens=64, seed=seed, temperature=1.0, logit_bias=call_now)
        choice0 = out.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        (call,) = choice0.message.tool_calls
        assert_valid(call.function.name, call.function.arguments, allowed)


def test_chat_forced_call_streamed(sdk, call_now) -> None:
    stream = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=64, seed=1,
                                         tool_choice={"type": "function", "function": {"name": "pick_color"}},
                                         logit_bias=call_now, stream=True)
    name, arguments, reasons = None, "", []
    for chunk in stream:
        for c in chunk.choices:
            for call in c.delta.tool_calls or []:
                name = call.function.name or name
                arguments += call.function.arguments or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert reasons == ["tool_calls"] and name is not None
    assert_valid(name, arguments, {"pick_color"})


@pytest.mark.parametrize("choice, allowed", [
    ("required", {"pick_color", "toggle"}),
    ({"type": "function", "name": "pick_color"}, {"pick_color"}),
])
def test_responses_forced_call(sdk, call_now, choice, allowed: set[str]) -> None:
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]}
             for t in TOOLS]
    out = sdk.responses.create(model=MODEL, input="Pick a color.", tools=tools, tool_choice=choice,
                               max_output_tokens=64, extra_body={"logit_bias": call_now, "seed": 2})
    calls = [item for item in out.output if item.type == "function_call"]
    assert out.status == "completed" and len(calls) == 1, out
    assert_valid(calls[0].name, calls[0].arguments, allowed)


def test_a_forced_function_that_is_not_a_tool_is_a_400(client: TestClient) -> None:
    reply = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4,
        "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice", reply.text
    reply = client.post("/v1/responses", json={"model": MODEL, "input": "x", "tool_choice": "required"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "tool_choice", reply.text
