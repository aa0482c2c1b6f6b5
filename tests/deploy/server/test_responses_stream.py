"""/v1/responses streamed: the event sequence the openai SDK parses (its own accumulator checks item
identities and order), the same output as without streaming, and the builder's events for reasoning,
text and tool calls."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter

from deploy.server.response_protocol import ReasoningSettings, ResponseObject
from deploy.server.response_events import ResponseBuilder
from model_shards.chat import Delta
from model_shards.tokenizer import RETURN
from tests.deploy.conftest import MODEL

openai = pytest.importorskip("openai")
from openai.types.responses import ResponseStreamEvent  # noqa: E402

pytestmark = pytest.mark.slow  # each test generates through the whole HTTP stack and the SDK

# min_tokens keeps <|return|> out for 6 tokens, the bias makes it win right after: a "completed" response.
STOPS_AFTER_6 = {"min_tokens": 6, "logit_bias": {str(RETURN): 100}}




def request(**extra: object) -> dict[str, object]:
    body = extra.pop("extra_body", {})
    return {"model": MODEL, "input": "Hi", "instructions": "Be brief.", "temperature": 0, **extra,
            "extra_body": {**STOPS_AFTER_6, **body}}


def test_stream_starts_created_ends_completed_with_the_unstreamed_text(sdk) -> None:
    whole = sdk.responses.create(**request())
    assert whole.status == "completed" and whole.usage.output_tokens == 7
    assert whole.output_text and "<|return|>" not in whole.output_text  # the stop token is not text
    events = list(sdk.responses.create(**request(stream=True)))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[1] == "response.in_progress"
    assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type in ("response.output_text.delta",
                                                          "response.reasoning_text.delta"))
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 7
    assert deltas == "".join(c.text for item in whole.output if item.type in ("message", "reasoning")
                             for c in item.content)
    assert [i.type for i in final.output] == [i.type for i in whole.output]


def test_sdk_stream_helper_accumulates_it(sdk) -> None:
    # responses.stream() replays every event into a snapshot and refuses an inconsistent sequence.
    with sdk.responses.stream(**request()) as stream:
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == sdk.responses.create(**request()).output_text


def test_stream_cut_by_max_output_tokens_ends_incomplete(sdk) -> None:
    events = list(sdk.responses.create(**request(stream=True, max_output_tokens=3, extra_body={"min_tokens": 0,
                                                                                              "logit_bias": {}})))
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 3


def test_stream_refusals_are_plain_400s(sdk) -> None:
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        sdk.responses.create(**request(stream=True, tool_choice="auto"))
    with pytest.raises(openai.BadRequestError, match="parameters"):
        sdk.responses.create(**request(stream=True, tools=[{"type": "function", "name": "f",
                                                            "parameters": {"type": "nonsense"}}]))


def test_tools_are_rendered_and_echoed(sdk) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    plain = sdk.responses.create(**request())
    out = sdk.responses.create(**request(tools=[tool]))
    assert out.tools[0].name == "get_weather" and out.usage.input_tokens > plain.usage.input_tokens


def pending() -> ResponseObject:
    return ResponseObject(id="resp_1", created_at=0, model=MODEL, status="in_progress", output=[],
                          reasoning=ReasoningSettings(effort="low"), temperature=1.0, top_p=1.0)


def test_builder_events_for_reasoning_text_and_a_tool_call() -> None:
    builder = ResponseBuilder(pending())
    events = builder.start()
    events += builder.feed([Delta("reasoning", "Think"), Delta("reasoning", "ing.")])
    events += builder.feed([Delta("content", "Hello")])
    events += builder.feed([Delta("tool_call", '{"city"', 0, "get_weather", "call_a")])
    events += builder.feed([Delta("tool_call", ': "Oslo"}', 0)])
    events += builder.feed([Delta("tool_call", "{}", 1, "now", "call_b")])
    events += builder.finish(pending().model_copy(update={"status": "completed"}))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.delta", "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e.model_dump()) for e in events]  # the SDK's types
    final = parsed[-1].response
    assert [i.type for i in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[0].content[0].text == "Thinking." and final.output_text == "Hello"
    assert (final.output[2].name, final.output[2].arguments, final.output[2].call_id) == (
        "get_weather", '{"city": "Oslo"}', "call_a")
    assert parsed[-2].item.arguments == "{}" and [e.sequence_number for e in parsed] == list(range(len(parsed)))


def test_builder_gives_an_empty_message_when_nothing_was_written() -> None:
    builder = ResponseBuilder(pending())
    builder.start()
    events = builder.finish(pending().model_copy(update={"status": "incomplete"}))
    assert [e.type for e in events][-1] == "response.incomplete"
    assert [i.type for i in builder.response.output] == ["message"]
