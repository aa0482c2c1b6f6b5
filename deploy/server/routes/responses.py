"""/v1/responses (which Ray Serve LLM lacks): the chain of thought as reasoning items, the answer as an
output_text message and tool calls as function_call items, whole or as the SDK's event stream
(deploy/server/response_events.py builds both from the same deltas).

Responses are stored unless `store: false` (deploy/server/store.py, shared by every Serve replica):
`previous_response_id` continues from one, `GET` and `DELETE /v1/responses/{id}` read and remove one,
and `background: true` answers at once with a queued response that `GET` polls. A client may also
continue by sending back the earlier output items and its function_call_output items
(deploy/server/response_input.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from pydantic import TypeAdapter

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from deploy.server.errors import APIError, bad_request, to_api_error
from deploy.server.generation import Generation
from deploy.server.protocol import ERROR_RESPONSES, parse_logit_bias
from deploy.server.response_protocol import (IncompleteDetails, InputTokensDetails, OutputTokensDetails,
                                             ReasoningSettings, ResponseDeleted, ResponseError, ResponseObject,
                                             ResponsesRequest, ResponseUsage)
from deploy.server.response_events import ResponseBuilder, StreamEvent
from deploy.server.response_input import InputItem, chat_messages
from deploy.server.service import ApiService, get_service
from deploy.server.sse import STREAM_RESPONSE, sse_response
from deploy.server.store import ResponseStore, StoredResponse
from deploy.server.structured import answer_grammar, tool_call_grammar
from model_shards.chat import ChatFormatError, CompletionParser, render_chat
from model_shards.tokenizer import CHAT_STOP_TOKENS

router = APIRouter()
INPUT_ITEMS = TypeAdapter(list[InputItem])
PARAM_NAMES = {"prompt": "input", "max_tokens": "max_output_tokens"}


def _messages(instructions: str | None, context: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """This request's instructions (an earlier turn's are not carried over, as OpenAI's are not) and the
    context's items as chat messages, for the harmony renderer."""
    messages: list[dict[str, Any]] = [{"role": "developer", "content": instructions}] if instructions else []
    return messages + chat_messages(INPUT_ITEMS.validate_python(context))


class ResponseRun:
    """One response: the engine's run, the parser, and the builder of items and events."""

    def __init__(self, run: Generation, builder: ResponseBuilder, saver: Saver) -> None:
        self.run = run
        self.builder = builder
        self.saver = saver
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
        """The events; a failure after the stream started ends it with an `error` event. The finished
        response is stored before the stream ends."""
        try:
            async for e in self.events():
                yield e
            await self.saver.save(self.builder.response)
        except Exception as exc:
            error = to_api_error(exc).body()["error"]
            yield self.builder.error(error["message"] or "", error["code"], error["param"])

    async def in_background(self) -> None:
        """A background response: generated to its end, then stored; a failure is stored as one."""
        try:
            async for _ in self.events():
                pass
            final = self.builder.response
        except Exception as exc:
            error = to_api_error(exc).body()["error"]
            final = self.builder.response.model_copy(update={
                "status": "failed", "error": ResponseError(code=error["code"] or "server_error",
                                                           message=error["message"] or "")})
        await self.saver.save(final)


@router.post("/v1/responses", response_model=ResponseObject, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
async def responses(req: ResponsesRequest,
                    service: ApiService = Depends(get_service)) -> ResponseObject | StreamingResponse:
    service.check_model(req.model)
    req.check()
    store = service.store if req.store is not False else None
    if req.background and store is None:
        raise bad_request("background responses need a response store; this server stores none", "background")
    context = await _context(service, req)
    effort = req.reasoning.effort if req.reasoning and req.reasoning.effort else "medium"
    try:
        prompt_ids = render_chat(_messages(req.instructions, context), reasoning_effort=effort, tools=req.chat_tools())
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
        previous_response_id=req.previous_response_id, store=store is not None, background=req.background,
        tool_choice=req.tool_choice or "auto", tools=req.tools or [], reasoning=ReasoningSettings(effort=effort),
        temperature=params.temperature, top_p=params.top_p)
    response = ResponseRun(run, ResponseBuilder(pending), Saver(store, response_id, context))
    if req.background:
        queued = pending.model_copy(update={"status": "queued"})
        await response.saver.save(queued)
        task = asyncio.create_task(response.in_background())
        service.background.add(task)
        task.add_done_callback(service.background.discard)
        return queued
    if req.stream:
        return sse_response(response.streamed(), named=True)
    async for _ in response.events():
        pass
    await response.saver.save(response.builder.response)
    return response.builder.response


async def _context(service: ApiService, req: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items this response answers, in the Responses API's form: with previous_response_id
    the earlier turn's context and output come first (harmony's renderer then drops the reasoning of
    turns that ended in a final answer, as the format says for completed turns)."""
    items = [{"type": "message", "role": "user", "content": req.input}] if isinstance(req.input, str) \
        else [item.model_dump(exclude_none=True) for item in req.input]
    if req.previous_response_id is None:
        return items
    if service.store is None:
        raise bad_request("previous_response_id needs a response store; this server stores none",
                          "previous_response_id")
    earlier = await asyncio.to_thread(service.store.get, req.previous_response_id)
    if earlier is None:
        raise APIError(404, f"Previous response with id '{req.previous_response_id}' not found.",
                       "invalid_request_error", "previous_response_id", "previous_response_not_found")
    if earlier.response.get("status") in ("queued", "in_progress"):
        raise bad_request(f"response {req.previous_response_id} is still {earlier.response['status']}",
                          "previous_response_id")
    return earlier.context + earlier.response["output"] + items


class Saver:
    """Keeps a response in the store (when it is stored): its object, and the context it answered."""

    def __init__(self, store: ResponseStore | None, response_id: str, context: list[dict[str, Any]]) -> None:
        self.store, self.response_id, self.context = store, response_id, context

    async def save(self, response: ResponseObject) -> None:
        if self.store is not None:
            record = StoredResponse(response.model_dump(mode="json"), self.context)
            await asyncio.to_thread(self.store.put, self.response_id, record)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def get_response(response_id: str, service: ApiService = Depends(get_service)) -> dict[str, Any]:
    return (await _stored(service, response_id)).response


@router.delete("/v1/responses/{response_id}", response_model=ResponseDeleted, responses=ERROR_RESPONSES)
async def delete_response(response_id: str, service: ApiService = Depends(get_service)) -> ResponseDeleted:
    await _stored(service, response_id)
    assert service.store is not None
    await asyncio.to_thread(service.store.delete, response_id)
    return ResponseDeleted(id=response_id)


async def _stored(service: ApiService, response_id: str) -> StoredResponse:
    found = await asyncio.to_thread(service.store.get, response_id) if service.store is not None else None
    if found is None:
        raise APIError(404, f"No response with id '{response_id}' found.", "invalid_request_error", "response_id",
                       "not_found")
    return found
