"""/v1/responses input items: a conversation continued as the SDK's tool-calling loop sends it (the
earlier output items sent back with their ids and statuses, then function_call_output items)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from deploy.server.response_input import FunctionCallInput, FunctionCallOutput, InputMessage, ReasoningInput, chat_messages
from model_shards.chat import render_chat
from model_shards.tokenizer import decode
from tests.deploy.conftest import MODEL

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TURN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "reasoning", "id": "rs_1", "status": "completed", "summary": [],
     "content": [{"type": "reasoning_text", "text": "I should call the tool."}]},
    {"type": "function_call", "id": "fc_1", "call_id": "call_7", "name": "get_weather",
     "arguments": "{\"city\": \"Paris\"}", "status": "completed"},
    {"type": "function_call_output", "call_id": "call_7", "output": "{\"sky\": \"clear\", \"celsius\": 21}"},
]


def test_items_become_harmony_messages(vocab: Path) -> None:
    items = [InputMessage(role="user", content="Weather in Paris?"),
             ReasoningInput(type="reasoning", content=[{"type": "reasoning_text", "text": "I should call the tool."}]),
             FunctionCallInput(type="function_call", call_id="call_7", name="get_weather", arguments='{"city":"Paris"}'),
             FunctionCallOutput(type="function_call_output", call_id="call_7", output='{"sky":"clear"}')]
    messages = chat_messages(items)
    assert [m["role"] for m in messages] == ["user", "assistant", "assistant", "tool"]
    text = decode(render_chat(messages))
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary" in text  # the call, to its recipient
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"sky\":\"clear\"}" in text
    assert text.endswith("<|start|>assistant")




def test_the_sdk_tool_loop_continues_a_conversation(sdk) -> None:
    first = sdk.responses.create(model=MODEL, input=TURN[:1], tools=TOOLS, max_output_tokens=4, temperature=0)
    # what the SDK's loop sends next: the earlier output items as they came, then the call's result
    items = TURN[:1] + [item.model_dump(exclude_none=True) for item in first.output] + TURN[1:]
    second = sdk.responses.create(model=MODEL, input=items, tools=TOOLS, max_output_tokens=4, temperature=0)
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens + 20  # the call and its output are in the prompt


def test_a_call_output_without_its_call_is_a_clear_400(client: TestClient) -> None:
    r = client.post("/v1/responses", json={"model": MODEL, "input": [TURN[0], TURN[3]], "max_output_tokens": 4})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input" and "tool_call_id" in error["message"]
    r = client.post("/v1/responses", json={"model": MODEL, "max_output_tokens": 4,
                                           "input": [{"type": "function_call", "call_id": "c", "name": "f"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")  # no arguments
