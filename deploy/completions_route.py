"""POST /v1/completions: raw prompts (text or token ids, one or a list), whole or streamed."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from cluster.engine import EngineUnavailable, Event
from deploy.api import Api
from deploy.engine_client import EventStream
from deploy.errors import bad_request, sse_error
from deploy.protocol import ERROR_RESPONSES, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage
from deploy.text import Detokenizer, StopFilter, token_text
from model_shards.tokenizer import TEXT_STOP_TOKENS, encode

STREAM_RESPONSE = {200: {"content": {"text/event-stream": {}}, "description": "a completion, or SSE with stream=true"}}


def prompt_ids(api: Api, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise bad_request("the prompt must not be empty", "prompt")
            p = encode(p)
        api.check_token_ids(p)
        out.append(p)
    return out


@dataclass
class ChoiceState:
    """One prompt's completion as it grows."""

    index: int
    prompt: list[int]
    stops: StopFilter
    detok: Detokenizer = field(default_factory=Detokenizer)
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    token_strings: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    reason: str | None = None

    def add(self, event: Event, want_logprobs: bool) -> str:
        """Record a token; returns the text it made visible."""
        assert event.token is not None
        if want_logprobs:
            self.offsets.append(sum(len(t) for t in self.text))
            self.token_strings.append(token_text(event.token))
            self.token_logprobs.append(float(event.logprob or 0.0))
            self.top.append({token_text(t): lp for t, lp in event.top_logprobs})
        self.tokens.append(event.token)
        visible = self.stops.push(self.detok.push(event.token))
        self.text.append(visible)
        return visible

    def finish(self, engine_reason: str | None) -> str:
        tail = "" if self.stops.stopped else self.stops.push(self.detok.flush()) + self.stops.flush()
        self.text.append(tail)
        self.reason = "stop" if self.stops.stopped else (engine_reason or "stop")
        return tail

    def logprobs(self) -> CompletionLogprobs:
        return CompletionLogprobs(tokens=self.token_strings, token_logprobs=self.token_logprobs, top_logprobs=self.top,
                                  text_offset=self.offsets)


async def run_choice(api: Api, stream: EventStream, state: ChoiceState, want_logprobs: bool,
                     out: asyncio.Queue[tuple[ChoiceState, str, Event | None]] | None = None) -> ChoiceState:
    """Drive one prompt to its end; with `out`, also report each visible piece as it comes."""
    outcome: dict[str, str] = {}
    last: Event | None = None
    async with aclosing(api.events(stream, len(state.prompt), outcome)) as events:
        async for event in events:
            last = event
            if event.token is not None:
                visible = state.add(event, want_logprobs)
                if out is not None:
                    await out.put((state, visible, event))
                if state.stops.stopped:
                    outcome["reason"] = "stop"
                    break
    if last is not None and last.finish_reason == "error":
        raise EngineUnavailable(last.error or "generation failed")
    tail = state.finish(last.finish_reason if last else None)
    if out is not None:
        await out.put((state, tail, None))
    return state


def install(app: FastAPI, api: Api) -> None:
    @app.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
    async def completions(req: CompletionRequest) -> Any:
        api.check_model(req.model)
        api.check_unsupported(req.presence_penalty, req.frequency_penalty)
        if req.echo:
            raise bad_request("echo is not supported", "echo", "unsupported_parameter")
        if req.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
        prompts = prompt_ids(api, req.prompt)
        for p in prompts:
            api.check_length(len(p), req.max_tokens, "prompt")
        stops = () if req.ignore_eos else TEXT_STOP_TOKENS
        want_logprobs = req.logprobs is not None
        params = api.sampling(req.max_tokens, req.temperature, req.top_p, req.seed, stops, req.logprobs or 0,
                              api.logit_bias(req.logit_bias))
        stop_strings = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        request_id = api.new_id("cmpl")
        streams: list[EventStream] = []
        try:
            for i, p in enumerate(prompts):
                streams.append(api.submit(p, params, f"{request_id}-{i}"))
        except BaseException:
            for s in streams:
                await s.aclose()
            raise
        states = [ChoiceState(i, p, StopFilter(stop_strings)) for i, p in enumerate(prompts)]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_completions(api, streams, states, req, request_id, include_usage),
                                     media_type="text/event-stream")
        try:
            await asyncio.gather(*(run_choice(api, s, st, want_logprobs) for s, st in zip(streams, states)))
        finally:
            for s in streams:
                await s.aclose()
        choices = [CompletionChoice(index=st.index, text="".join(st.text), finish_reason=st.reason or "stop",
                                    logprobs=st.logprobs() if want_logprobs else None,
                                    token_ids=st.tokens if req.return_token_ids else None,
                                    prompt_token_ids=st.prompt if req.return_token_ids else None) for st in states]
        generated = sum(len(st.tokens) for st in states)
        prompt_tokens = sum(len(p) for p in prompts)
        return Completion(id=request_id, created=int(time.time()), model=req.model, choices=choices,
                          usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=generated,
                                      total_tokens=prompt_tokens + generated))


async def stream_completions(api: Api, streams: list[EventStream], states: list[ChoiceState], req: CompletionRequest,
                             request_id: str, include_usage: bool) -> AsyncIterator[str]:
    created = int(time.time())
    want_logprobs = req.logprobs is not None
    pieces: asyncio.Queue[tuple[ChoiceState, str, Event | None]] = asyncio.Queue()
    tasks = [asyncio.create_task(run_choice(api, s, st, want_logprobs, pieces)) for s, st in zip(streams, states)]
    started: set[int] = set()

    def chunk(state: ChoiceState, text: str, event: Event | None) -> str:
        choice: dict[str, Any] = {"index": state.index, "text": text, "logprobs": None,
                                  "finish_reason": state.reason if event is None else None}
        if want_logprobs and event is not None:
            choice["logprobs"] = {"tokens": state.token_strings[-1:], "token_logprobs": state.token_logprobs[-1:],
                                  "top_logprobs": state.top[-1:], "text_offset": state.offsets[-1:]}
        if req.return_token_ids:
            choice["token_ids"] = [event.token] if event is not None else []
            if state.index not in started:
                choice["prompt_token_ids"] = state.prompt
                started.add(state.index)
        body = {"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        done = 0
        while done < len(tasks):
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait([getter, *[t for t in tasks if not t.done()]], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                failed = [t for t in tasks if t.done() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                continue
            state, text, event = getter.result()
            done += event is None
            if text or event is not None or state.reason is not None:
                yield chunk(state, text, event)
        if include_usage:
            generated = sum(len(st.tokens) for st in states)
            prompt_tokens = sum(len(st.prompt) for st in states)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                     "total_tokens": prompt_tokens + generated}
            body = {"id": request_id, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [], "usage": usage}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as exc:  # the stream already said 200: the error goes in-band
        yield sse_error(exc)
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
    yield "data: [DONE]\n\n"
