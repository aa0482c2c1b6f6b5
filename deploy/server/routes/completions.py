"""POST /v1/completions: raw prompts (text or token ids, one or a list), whole or streamed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from cluster.engine.events import Event
from deploy.server.errors import bad_request
from deploy.server.generation import Generation, merged, until_stopped, usage
from deploy.server.protocol import (ERROR_RESPONSES, Completion, CompletionChoice, CompletionChunk, CompletionChunkChoice,
                             CompletionLogprobs, CompletionRequest, parse_logit_bias)
from deploy.server.service import ApiService, get_service
from deploy.server.sse import STREAM_RESPONSE, sse_response
from deploy.server.structured import answer_grammar
from deploy.server.text import Detokenizer, StopFilter, token_text
from model_shards.tokenizer import TEXT_STOP_TOKENS, encode

router = APIRouter()


def prompt_ids(prompt: Any) -> list[list[int]]:
    """Any of the four prompt forms -> one list of ids per prompt (the engine checks the ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        prompt = [prompt]
    return [encode(p) if isinstance(p, str) else p for p in prompt]  # (the schema refuses invalid Unicode)


@dataclass
class ChoiceState:
    """One prompt's completion as it grows."""

    index: int
    prompt: list[int]
    stops: StopFilter
    want_logprobs: bool
    stop_ids: tuple[int, ...] = ()  # the stop tokens that end it: not part of its text (as vLLM shows it)
    detok: Detokenizer = field(default_factory=Detokenizer)
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    token_strings: list[str] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    reason: str | None = None

    def add(self, event: Event) -> str:
        """Record a token; returns the text it made visible."""
        assert event.token is not None
        if self.want_logprobs:
            self.offsets.append(sum(len(t) for t in self.text))
            self.token_strings.append(token_text(event.token))
            self.token_logprobs.append(float(event.logprob or 0.0))
            top = {token_text(t): lp for t, lp in event.top_logprobs}
            if event.top_logprobs:  # the chosen token is always among them (as OpenAI and vLLM report)
                top.setdefault(token_text(event.token), float(event.logprob or 0.0))
            self.top.append(top)
        self.tokens.append(event.token)
        if event.token in self.stop_ids:
            return ""
        visible = self.stops.push(self.detok.push(event.token))
        self.text.append(visible)
        return visible

    def finish(self, reason: str) -> str:
        tail = "" if self.stops.stopped else self.stops.push(self.detok.flush()) + self.stops.flush()
        self.text.append(tail)
        self.reason = reason
        return tail

    def logprobs(self, last: int | None = None) -> CompletionLogprobs:
        """All of them, or those of the last `last` tokens (a stream chunk's)."""
        cut = slice(-last, None) if last else slice(None)
        return CompletionLogprobs(tokens=self.token_strings[cut], token_logprobs=self.token_logprobs[cut],
                                  top_logprobs=self.top[cut], text_offset=self.offsets[cut])


async def run_choice(run: Generation, state: ChoiceState) -> AsyncIterator[tuple[str, bool]]:
    """Drive one choice to its end: (visible text, whether it is the last piece) as they come."""
    async for text in until_stopped(run, state.add, lambda: state.stops.stopped):
        yield text, False
    yield state.finish(run.finish_reason), True


async def drain(run: Generation, state: ChoiceState) -> None:
    async for _ in run_choice(run, state):
        pass


@router.post("/v1/completions", response_model=Completion, responses={**ERROR_RESPONSES, **STREAM_RESPONSE})
async def completions(req: CompletionRequest,
                      service: ApiService = Depends(get_service)) -> Completion | StreamingResponse:
    service.check_model(req.model)
    req.check()
    if req.echo:
        raise bad_request("echo is not supported", "echo", "unsupported_parameter")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
    prompts = prompt_ids(req.prompt)
    stops = () if req.ignore_eos else TEXT_STOP_TOKENS
    params = service.sampling(req.max_tokens, req.temperature, req.top_p, req.seed, stops, req.logprobs is not None,
                              req.logprobs or 0, parse_logit_bias(req.logit_bias, service.vocab_size), req.controls(),
                              answer_grammar(req.response_format, req.structured_outputs, chat=False))
    stop_strings = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    request_id = service.new_id("cmpl")
    runs = service.start_choices(prompts, params, request_id, req.n)
    states = [ChoiceState(i, prompts[i // req.n], StopFilter(stop_strings), req.logprobs is not None, stops)
              for i in range(len(runs))]
    leaders = runs[::req.n]  # one run per prompt: usage counts each prompt once
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return sse_response(stream_completions(runs, states, req, request_id, leaders if include_usage else None))
    try:
        await asyncio.gather(*(drain(r, st) for r, st in zip(runs, states)))
    finally:
        for r in runs:
            await r.aclose()
    choices = [CompletionChoice(index=st.index, text="".join(st.text), finish_reason=st.reason or "stop",
                                logprobs=st.logprobs() if st.want_logprobs else None,
                                token_ids=st.tokens if req.return_token_ids else None,
                                prompt_token_ids=st.prompt if req.return_token_ids else None) for st in states]
    return Completion(id=request_id, created=int(time.time()), model=req.model, choices=choices,
                      usage=usage(leaders, runs))


async def stream_completions(runs: list[Generation], states: list[ChoiceState], req: CompletionRequest,
                             request_id: str, leaders: list[Generation] | None) -> AsyncIterator[CompletionChunk]:
    created = int(time.time())

    async def choice_chunks(run: Generation, state: ChoiceState) -> AsyncIterator[CompletionChunk]:
        first = True
        async for text, last in run_choice(run, state):
            choice = CompletionChunkChoice(index=state.index, text=text, finish_reason=state.reason if last else None,
                                           logprobs=state.logprobs(1) if state.want_logprobs and not last else None)
            if req.return_token_ids:
                choice.token_ids = [] if last else state.tokens[-1:]
                choice.prompt_token_ids = state.prompt if first else None
            first = False
            yield CompletionChunk(id=request_id, created=created, model=req.model, choices=[choice])

    try:
        async for chunk in merged([choice_chunks(r, st) for r, st in zip(runs, states)]):
            yield chunk
        if leaders is not None:
            yield CompletionChunk(id=request_id, created=created, model=req.model, choices=[],
                                  usage=usage(leaders, runs))
    finally:
        for r in runs:
            await r.aclose()
