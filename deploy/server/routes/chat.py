"""POST /v1/chat/completions: harmony in, reasoning / content / tool calls out, whole or streamed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from cluster.engine.events import Event
from deploy.server.errors import bad_request
from deploy.server.generation import Generation, merged, until_stopped, usage
from deploy.server.protocol import (ERROR_RESPONSES, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                             ChatCompletionChunk, ChatCompletionRequest, ChatDelta, ChoiceLogprobs, FunctionCall,
                             NamedToolChoice, TokenLogprob, ToolCallDelta, ToolCallFunctionDelta, ToolCallOut,
                             TopLogprob, parse_logit_bias)
from deploy.server.service import ApiService, get_service
from deploy.server.sse import STREAM_RESPONSE, sse_response
from deploy.server.structured import answer_grammar, tool_call_grammar
from deploy.server.text import StopFilter, token_bytes, token_text
from model_shards.chat import CompletionParser, Delta, render_chat
from model_shards.sampling import SamplingParams
from model_shards.tokenizer import CHAT_STOP_TOKENS

router = APIRouter()
PARAM_NAMES = {"prompt": "messages"}  # the engine's names for what this route calls otherwise


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: list[str]
    logprobs: bool


def prepare(service: ApiService, req: ChatCompletionRequest) -> Prepared:
    service.check_model(req.model)
    req.check()
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and req.tool_choice != "none" else None
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    prompt_ids = render_chat(messages, reasoning_effort=req.reasoning_effort or "medium", tools=tools)
    max_tokens = req.max_completion_tokens or req.max_tokens or service.default_max_tokens(len(prompt_ids))
    stops = () if req.ignore_eos else CHAT_STOP_TOKENS
    params = service.sampling(max_tokens, req.temperature, req.top_p, req.seed, stops, req.logprobs,
                              req.top_logprobs or 0 if req.logprobs else 0,
                              parse_logit_bias(req.logit_bias, service.vocab_size), req.controls(),
                              forced_call(req) or answer_grammar(req.response_format, req.structured_outputs, chat=True))
    stop_strings = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return Prepared(prompt_ids, params, stop_strings, req.logprobs)


def forced_call(req: ChatCompletionRequest) -> str | None:
    """tool_choice "required" or a named function: the answer is that call (structured.tool_call_grammar);
    a forced turn has no final answer for response_format to shape."""
    choice = req.tool_choice.function.name if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
    tools = [(t.function.name, t.function.parameters) for t in req.tools or []]
    return tool_call_grammar(tools, choice)


def logprob_entry(event: Event) -> TokenLogprob:
    assert event.token is not None and event.logprob is not None
    return TokenLogprob(token=token_text(event.token), logprob=event.logprob, bytes=list(token_bytes(event.token)),
                        top_logprobs=[TopLogprob(token=token_text(t), logprob=lp, bytes=list(token_bytes(t)))
                                      for t, lp in event.top_logprobs])


@dataclass
class ChatState:
    """What a chat request has produced so far: the parsed channels, content through the stop-string
    filter, logprobs."""

    stops: StopFilter
    want_logprobs: bool
    parser: CompletionParser = field(default_factory=CompletionParser)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    streamed_calls: bool = False

    def feed(self, event: Event) -> list[Delta]:
        """Record one token; returns the deltas it made visible."""
        assert event.token is not None
        if self.want_logprobs:
            self.logprobs.append(logprob_entry(event))
        return self._apply(self.parser.feed(event.token))

    def finish(self) -> list[Delta]:
        """The deltas only known at the end (held-back text that turned out not to start a stop string)."""
        visible = self._apply(self.parser.finish())
        tail = self.stops.flush()
        if tail:
            self.content.append(tail)
            visible.append(Delta("content", tail))
        return visible

    def _apply(self, deltas: list[Delta]) -> list[Delta]:
        visible = []
        for d in deltas:
            if d.kind == "content":
                d = Delta("content", self.stops.push(d.text))
                if not d.text:
                    continue
                self.content.append(d.text)
            self.streamed_calls |= d.kind == "tool_call"
            visible.append(d)
        return visible


def finish_reason(run: Generation, has_tool_calls: bool) -> str:
    """A stop token after a tool call says "tool_calls"; a stop string always says "stop"."""
    reason = run.finish_reason
    return "tool_calls" if reason == "stop" and has_tool_calls and not run.stopped_by_string else reason


def chat_delta(d: Delta) -> ChatDelta:
    if d.kind == "content":
        return ChatDelta(content=d.text)
    if d.kind == "reasoning":
        return ChatDelta(reasoning=d.text)
    named = d.tool_name is not None
    return ChatDelta(tool_calls=[ToolCallDelta(
        index=d.tool_index or 0, id=d.tool_id if named else None, type="function" if named else None,
        function=ToolCallFunctionDelta(name=d.tool_name, arguments=d.text))])


async def run_choice(run: Generation, state: ChatState) -> AsyncIterator[tuple[list[Delta], Event | None]]:
    """Drive one choice to its end: (visible deltas, the token's event) as they come, then the deltas
    only known at the end (with no event)."""
    async for deltas, event in until_stopped(run, lambda e: (state.feed(e), e), lambda: state.stops.stopped):
        yield deltas, event
    yield state.finish(), None


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
async def chat_completions(req: ChatCompletionRequest,
                           service: ApiService = Depends(get_service)) -> ChatCompletion | StreamingResponse:
    prep = prepare(service, req)
    request_id = service.new_id("chatcmpl")
    runs = service.start_choices([prep.prompt_ids], prep.params, request_id, req.n, PARAM_NAMES)
    states = [ChatState(StopFilter(prep.stop_strings), prep.logprobs) for _ in runs]
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(stream_chat(runs, states, req.model, request_id, include_usage))
    try:
        choices = await asyncio.gather(*(whole_choice(i, r, st, prep.logprobs) for i, (r, st) in
                                         enumerate(zip(runs, states))))
    finally:
        for r in runs:
            await r.aclose()
    return ChatCompletion(id=request_id, created=int(time.time()), model=req.model, choices=list(choices),
                          usage=usage(runs[:1], runs))


async def whole_choice(index: int, run: Generation, state: ChatState, want_logprobs: bool) -> ChatChoice:
    async for _ in run_choice(run, state):
        pass
    parsed = state.parser.result()
    calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
             for c in parsed.tool_calls]
    text = "".join(state.content)
    message = AssistantMessage(content=text if text or not calls else None, reasoning=parsed.reasoning or None,
                               tool_calls=calls)
    return ChatChoice(index=index, message=message, finish_reason=finish_reason(run, bool(calls)),
                      logprobs=ChoiceLogprobs(content=state.logprobs) if want_logprobs else None)


async def stream_chat(runs: list[Generation], states: list[ChatState], model: str, request_id: str,
                      include_usage: bool) -> AsyncIterator[ChatCompletionChunk]:
    created = int(time.time())

    def chunk(index: int, delta: ChatDelta, reason: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> ChatCompletionChunk:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason,
                                 logprobs=ChoiceLogprobs(content=logprobs) if logprobs is not None else None)
        return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])

    async def choice_chunks(index: int, run: Generation, state: ChatState) -> AsyncIterator[ChatCompletionChunk]:
        yield chunk(index, ChatDelta(role="assistant", content=""))
        async for visible, event in run_choice(run, state):
            logprobs = state.logprobs[-1:] if state.want_logprobs and event is not None else None
            if visible:
                for i, d in enumerate(visible):
                    yield chunk(index, chat_delta(d), logprobs=logprobs if i == 0 else None)
            elif logprobs:
                yield chunk(index, ChatDelta(), logprobs=logprobs)
        yield chunk(index, ChatDelta(), finish_reason(run, state.streamed_calls))

    try:
        async for c in merged([choice_chunks(i, r, st) for i, (r, st) in enumerate(zip(runs, states))]):
            yield c
        if include_usage:
            yield ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                      usage=usage(runs[:1], runs))
    finally:
        for r in runs:
            await r.aclose()
