"""Structured outputs through the openai SDK (in process, local engine, random weights): JSON that
validates against a schema on completions, on chat's final channel (streamed too) and on
/v1/responses; vLLM's `structured_outputs` (choice, regex, grammar); and 400s that name the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from fastapi.testclient import TestClient

from model_shards.tokenizer import encode
from tests.deploy.conftest import MODEL

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK

SCHEMA = {"type": "object", "properties": {"done": {"type": "boolean"},
                                           "color": {"enum": ["red", "green", "blue"]},
                                           "count": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["done", "color", "count"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Pick a color."}]




@pytest.fixture(scope="module")
def final_now(vocab) -> dict[str, int]:
    # A random model almost never ends its reasoning (1 chance in 200k per token to pick <|end|>);
    # favouring the "final" token makes it open the final channel at once, where the grammar applies.
    return {str(encode("final")[0]): 30}


def test_completions_json_schema_validates(sdk) -> None:
    for seed in range(3):
        out = sdk.completions.create(model=MODEL, prompt="Answer in JSON:", max_tokens=40, seed=seed,
                                     extra_body={"response_format": JSON_SCHEMA_FORMAT})
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), SCHEMA)
        assert " " not in choice.text  # compact


def test_chat_json_schema_applies_to_the_final_channel(sdk, final_now) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=1,
                                      response_format=JSON_SCHEMA_FORMAT, logit_bias=final_now)
    choice = out.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    streamed = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=1, stream=True,
                                           response_format=JSON_SCHEMA_FORMAT, logit_bias=final_now)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == choice.message.content


def test_chat_json_object(sdk, final_now) -> None:
    out = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60, seed=4,
                                      response_format={"type": "json_object"}, logit_bias=final_now)
    if out.choices[0].finish_reason == "stop":  # any object: a random one may still be open at the end
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.startswith("{")


def test_responses_text_format(sdk, final_now) -> None:
    out = sdk.responses.create(model=MODEL, input="Pick a color.", max_output_tokens=40, temperature=0,
                               text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}},
                               extra_body={"logit_bias": final_now})
    assert out.status == "completed"
    jsonschema.validate(json.loads(out.output_text), SCHEMA)


def test_structured_outputs_choice_regex_and_grammar(sdk, final_now) -> None:
    choices = ["alpha", "beta gamma", "délta"]
    for seed in range(3):
        out = sdk.completions.create(model=MODEL, prompt="Choose:", max_tokens=10, seed=seed,
                                     extra_body={"structured_outputs": {"choice": choices}})
        assert out.choices[0].text in choices and out.choices[0].finish_reason == "stop"
    chat = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, seed=0, logit_bias=final_now,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert chat.choices[0].message.content in choices
    out = sdk.completions.create(model=MODEL, prompt="Code:", max_tokens=12, seed=5,
                                 extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}})
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", out.choices[0].text)
    out = sdk.completions.create(model=MODEL, prompt="Say:", max_tokens=12, seed=5,
                                 extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no" " way"'}})
    assert out.choices[0].text in ("yes", "no way")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),  # schema errors name the top field
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_bad_constraints_are_400_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    for route, extra in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        reply = client.post(route, json={"model": MODEL, "max_tokens": 4, **extra, **body})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error", error


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


WIDE = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(12_000)}}


@pytest.mark.parametrize("schema", [nested(200), nested(450), WIDE], ids=["200-deep", "450-deep", "wide"])
def test_oversized_schemas_are_400_naming_the_field_not_500(client: TestClient, schema: dict) -> None:
    cases = [("/v1/chat/completions", {"messages": MESSAGES, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
              "response_format.json_schema.schema"),
             ("/v1/completions", {"prompt": "x", "structured_outputs": {"json": schema}}, "structured_outputs.json"),
             ("/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function", "function": {
                 "name": "f", "parameters": schema}}]}, "tools[0].function.parameters"),
             ("/v1/responses", {"input": "x", "tools": [{"type": "function", "name": "f", "parameters": schema}]},
              "tools[0].parameters")]
    for route, extra, param in cases:
        reply = client.post(route, json={"model": MODEL, "max_tokens": 4, **extra} if route != "/v1/responses"
                            else {"model": MODEL, "max_output_tokens": 4, **extra})
        assert reply.status_code == 400, (route, reply.status_code, reply.text[:300])
        error = reply.json()["error"]
        assert error["param"] == param and ("deeply" in error["message"] or "too large" in error["message"]), error


def test_a_schema_at_the_depth_limit_still_works(client: TestClient) -> None:
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                                 "structured_outputs": {"json": nested(20)}})
    assert reply.status_code == 200, reply.text


def test_a_body_nested_beyond_the_json_decoder_is_a_400(client: TestClient) -> None:
    """Deeper than Python's JSON decoder recurses: the body itself cannot be read, which is the client's
    error, not the server's."""
    depth = 5000
    body = ('{"model": "%s", "prompt": "x", "max_tokens": 4, "structured_outputs": {"json": ' % MODEL
            + '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth + "}}")
    reply = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text[:300]
    assert reply.json()["error"]["type"] == "invalid_request_error"
