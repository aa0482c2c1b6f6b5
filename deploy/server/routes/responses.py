"""POST /v1/responses (which Ray Serve LLM lacks): the chain of thought as reasoning items, the answer
as an output_text message and tool calls as function_call items, whole or as the SDK's event stream
(deploy/server/response_events.py builds both from the same deltas). Responses are not stored, so
`previous_response_id` is refused: a client continues by sending back the earlier output items and
its function_call_output items (deploy/server/response_input.py)."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from deploy.server.errors import bad_request, to_api_error
from deploy.server.generation import Generation
from deploy.server.protocol import (ERROR_RESPONSES, IncompleteDetails, InputTokensDetails, OutputTokensDetails,
                             ReasoningSettings, ResponseObject, ResponsesRequest, ResponseUsage, parse_logit_bias)
from deploy.server.response_events import ResponseBuilder, StreamEvent
from deploy.server.response_input import chat_messages
from deploy.server.service import ApiService, get_service
from deploy.server.sse import STREAM_RESPONSE, sse_response
from deploy.server.structured import answer_grammar, tool_call_grammar
from model_shards.chat import ChatFormatError, CompletionParser, render_chat
from model_shards.tokenizer import CHAT_STOP_TOKENS

router = APIRouter()
PARAM_NAMES = {"prompt": "input", "max_tokens": "max_output_tokens"}


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The instructions and the input as chat messages, for the harmony renderer."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "developer", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    return messages + chat_messages(req.input)


class ResponseRun:
    """One response: the engine's run, the parser, and the builder of items and events."""

    def __init__(self, run: Generation, builder: ResponseBuilder) -> None:
        self.run = run
        self.builder = builder
        self.parser = CompletionParser()
        self.reasoning_tokens = 0  # tokens that wrote reasoning

    async def events(self) -> AsyncIterator[StreamEvent]:
        """Every event from `response.created` to `response.completed` (or `.incomplete`)."""
        for e in self.builder.start():
            yield e
        async with self.run:
            async for event in self.run:
                assert event.token is not None
                deltas = self.parser.feed(event.token)
                self.reasoning_tokens += any(d.kind == "reasoning" for d in deltas)
                for e in self.builder.feed(deltas):
                    yield e
        for e in self.builder.feed(self.parser.finish()):
            yield e
        for e in self.builder.finish(self._final()):
            yield e

    def _final(self) -> ResponseObject:
        run = self.run
        complete = run.finish_reason == "stop"
        usage = ResponseUsage(input_tokens=run.prompt_tokens,
                              input_tokens_details=InputTokensDetails(cached_tokens=run.cached_tokens),
                              output_tokens=run.generated,
                              output_tokens_details=OutputTokensDetails(reasoning_tokens=self.reasoning_tokens),
                              total_tokens=run.prompt_tokens + run.generated)
        return self.builder.response.model_copy(update={
            "status": "completed" if complete else "incomplete", "usage": usage,
            "incomplete_details": None if complete else IncompleteDetails(reason="max_output_tokens")})

    async def streamed(self) -> AsyncIterator[StreamEvent]:
        """The events; a failure after the stream started ends it with an `error` event."""
        try:
            async for e in self.events():
                yield e
        except Exception as exc:
            error = to_api_error(exc).body()["error"]
            yield self.builder.error(error["message"] or "", error["code"], error["param"])


@router.post("/v1/responses", response_model=ResponseObject, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
async def responses(req: ResponsesRequest,
                    service: ApiService = Depends(get_service)) -> ResponseObject | StreamingResponse:
    service.check_model(req.model)
    req.check()
    effort = req.reasoning.effort if req.reasoning and req.reasoning.effort else "medium"
    try:
        prompt_ids = render_chat(_messages(req), reasoning_effort=effort, tools=req.chat_tools())
    except ChatFormatError as exc:  # the chat route's field is `messages`; this one's is `input`
        raise bad_request(str(exc), "input") from None
    max_tokens = req.max_output_tokens or service.default_max_tokens(len(prompt_ids))
    fmt = req.text.format.as_response_format() if req.text and req.text.format else None
    params = service.sampling(max_tokens, req.temperature, req.top_p, req.seed,
                              () if req.ignore_eos else CHAT_STOP_TOKENS,
                              bias=parse_logit_bias(req.logit_bias, service.vocab_size), controls=req.controls(),
                              grammar=tool_call_grammar([(t.name, t.parameters) for t in req.tools or []],
                                                        req.forced_choice())
                              or answer_grammar(fmt, req.structured_outputs, chat=True, format_param="text.format"))
    response_id = service.new_id("resp").replace("-", "_")
    run = service.start(prompt_ids, params, response_id, PARAM_NAMES)
    pending = ResponseObject(
        id=response_id, created_at=int(time.time()), model=req.model, status="in_progress",
        instructions=req.instructions, max_output_tokens=req.max_output_tokens, output=[],
        tool_choice=req.tool_choice or "auto", tools=req.tools or [], reasoning=ReasoningSettings(effort=effort),
        temperature=params.temperature, top_p=params.top_p)
    response = ResponseRun(run, ResponseBuilder(pending))
    if req.stream:
        return sse_response(response.streamed(), named=True)
    async for _ in response.events():
        pass
    return response.builder.response
