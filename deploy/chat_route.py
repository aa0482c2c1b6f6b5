"""POST /v1/chat/completions: harmony in, reasoning / content / tool calls out, whole or streamed."""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from cluster.engine import EngineUnavailable, Event
from deploy.api import Api
from deploy.errors import bad_request, sse_error
from deploy.protocol import (ERROR_RESPONSES, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest,
                             ChoiceLogprobs, FunctionCall, TokenLogprob, ToolCallOut, TopLogprob, Usage)
from deploy.text import StopFilter, token_bytes, token_text
from model_shards.chat import CompletionParser, Delta, render_chat
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import CHAT_STOP_TOKENS

STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "a completion, or SSE with stream=true"}}


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: list[str]
    logprobs: bool


def prepare(api: Api, req: ChatCompletionRequest) -> Prepared:
    api.check_model(req.model)
    api.check_unsupported(req.presence_penalty, req.frequency_penalty)
    if req.response_format is not None and req.response_format.type != "text":
        if req.response_format.type == "json_schema" and not req.response_format.json_schema:
            raise bad_request("response_format json_schema needs a `json_schema`", "response_format")
        raise bad_request(f"response_format {req.response_format.type!r} is not supported; only 'text'",
                          "response_format", "unsupported_parameter")
    if req.tool_choice not in (None, "auto", "none"):
        raise bad_request("tool_choice can be 'auto' or 'none' here (forcing a call is not supported)", "tool_choice",
                          "unsupported_parameter")
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    prompt_ids = render_chat(messages, reasoning_effort=req.reasoning_effort or "medium", tools=tools)
    room = api.max_model_len - len(prompt_ids)
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, min(api.settings.default_max_tokens, room))
    api.check_length(len(prompt_ids), max_tokens, "messages")
    stops = () if req.ignore_eos else CHAT_STOP_TOKENS
    params = api.sampling(max_tokens, req.temperature, req.top_p, req.seed, stops,
                          req.top_logprobs or 0 if req.logprobs else 0, api.logit_bias(req.logit_bias))
    stop_strings = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Prepared(prompt_ids, params, stop_strings, req.logprobs)


def logprob_entry(event: Event) -> TokenLogprob:
    assert event.token is not None and event.logprob is not None
    return TokenLogprob(token=token_text(event.token), logprob=event.logprob, bytes=list(token_bytes(event.token)),
                        top_logprobs=[TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_bytes(t)))
                                      for t, lp in event.top_logprobs])


def finish_reason(engine_reason: str | None, stopped_by_string: bool, has_tool_calls: bool) -> str:
    if stopped_by_string:
        return "stop"
    if engine_reason == "stop" and has_tool_calls:
        return "tool_calls"
    return engine_reason or "stop"


@dataclass
class ChatState:
    """What a chat request has produced so far."""

    parser: CompletionParser = field(default_factory=CompletionParser)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, str]] = field(default_factory=dict)

    def apply(self, deltas: list[Delta], stops: StopFilter) -> list[Delta]:
        """Record deltas; content passes the stop-string filter. Returns the visible deltas."""
        visible = []
        for d in deltas:
            if d.kind == "content":
                d = Delta("content", stops.push(d.text))
                if not d.text:
                    continue
                self.content.append(d.text)
            elif d.kind == "reasoning":
                self.reasoning.append(d.text)
            else:
                call = self.calls.setdefault(d.tool_index or 0, {"id": d.tool_id or "", "name": d.tool_name or "",
                                                                 "arguments": ""})
                call["arguments"] += d.text
            visible.append(d)
        return visible


def _delta_json(d: Delta) -> dict[str, Any]:
    if d.kind == "content":
        return {"content": d.text}
    if d.kind == "reasoning":
        return {"reasoning": d.text}
    function: dict[str, str] = {"arguments": d.text}
    call: dict[str, Any] = {"index": d.tool_index, "function": function}
    if d.tool_name is not None:
        call.update(id=d.tool_id, type="function")
        function["name"] = d.tool_name
    return {"tool_calls": [call]}


def install(app: FastAPI, api: Api) -> None:
    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        prep = prepare(api, req)
        request_id = api.new_id("chatcmpl")
        stream = api.submit(prep.prompt_ids, prep.params, request_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_chat(api, stream, prep, req.model, request_id, include_usage),
                                     media_type="text/event-stream")
        state, stops, outcome, last = ChatState(), StopFilter(prep.stop_strings), {}, None
        async with aclosing(api.events(stream, len(prep.prompt_ids), outcome)) as events:
            async for event in events:
                last = event
                if event.token is not None:
                    state.tokens.append(event.token)
                    if prep.logprobs:
                        state.logprobs.append(logprob_entry(event))
                    state.apply(state.parser.feed(event.token), stops)
                    if stops.stopped:
                        outcome["reason"] = "stop"
                        break
        if last is not None and last.finish_reason == "error":
            raise EngineUnavailable(last.error or "generation failed")
        state.apply(state.parser.finish(), stops)
        state.content.append(stops.flush())
        parsed = state.parser.result()
        calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                 for c in parsed.tool_calls]
        reason = finish_reason(last.finish_reason if last else None, stops.stopped, bool(calls))
        text = "".join(state.content)
        message = AssistantMessage(content=text if text or not calls else None, reasoning=parsed.reasoning or None,
                                   tool_calls=calls)
        return ChatCompletion(
            id=request_id, created=int(time.time()), model=req.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=reason,
                                logprobs=ChoiceLogprobs(content=state.logprobs) if prep.logprobs else None)],
            usage=Usage(prompt_tokens=len(prep.prompt_ids), completion_tokens=len(state.tokens),
                        total_tokens=len(prep.prompt_ids) + len(state.tokens)))


async def stream_chat(api: Api, stream: Any, prep: Prepared, model: str, request_id: str,
                      include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = {"content": [lp.model_dump() for lp in logprobs]}
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    state, stops, outcome, last = ChatState(), StopFilter(prep.stop_strings), {}, None
    try:
        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(api.events(stream, len(prep.prompt_ids), outcome)) as events:
            async for event in events:
                last = event
                if event.token is None:
                    continue
                state.tokens.append(event.token)
                visible = state.apply(state.parser.feed(event.token), stops)
                logprobs = [logprob_entry(event)] if prep.logprobs else None
                for i, d in enumerate(visible or [None]):
                    if d is not None or logprobs:
                        yield chunk(_delta_json(d) if d else {}, logprobs=logprobs if i == 0 else None)
                if stops.stopped:
                    outcome["reason"] = "stop"
                    break
        if last is not None and last.finish_reason == "error":
            raise EngineUnavailable(last.error or "generation failed")
        tail = state.apply(state.parser.finish(), stops) + [Delta("content", stops.flush())]
        for d in tail:
            if d.text:
                yield chunk(_delta_json(d))
        yield chunk({}, finish_reason(last.finish_reason if last else None, stops.stopped, bool(state.calls)))
        if include_usage:
            usage = {"prompt_tokens": len(prep.prompt_ids), "completion_tokens": len(state.tokens),
                     "total_tokens": len(prep.prompt_ids) + len(state.tokens)}
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as exc:  # the stream already said 200: the error goes in-band
        yield sse_error(exc)
    yield "data: [DONE]\n\n"
