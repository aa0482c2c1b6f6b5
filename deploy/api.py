"""The OpenAI-compatible HTTP API as a FastAPI app, over any engine (local or cluster).

`create_api(engine, settings)` builds the app; the Serve deployment (app.py) calls it with its
engine, and tests call it directly. Routes: GET /v1/models, /health, /metrics; POST
/v1/chat/completions, /v1/completions, /v1/responses (chat_route.py, completions_route.py,
responses_route.py). Every error goes through errors.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from cluster.engine import Engine, Event
from deploy import errors
from deploy.engine_client import AsyncEngine, EventStream
from deploy.errors import APIError, bad_request
from deploy.metrics import ServerMetrics
from deploy.middleware import install_middleware
from deploy.protocol import ERROR_RESPONSES, ModelCard, ModelList
from model_shards.sampling import SamplingParams


@dataclass(frozen=True)
class ApiSettings:
    model_name: str
    api_key: str | None = None  # required on /v1/* when set
    max_body_bytes: int = 4 << 20
    request_timeout_s: float | None = None  # None: requests may run as long as they need
    default_max_tokens: int = 4096  # when a chat request gives none (KV is reserved for all of it)


class Api:
    """What the routes share: the engine, settings, metrics and the request pipeline."""

    def __init__(self, engine: Engine, settings: ApiSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())
        self.vocab_size = engine.model_config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found")

    def check_length(self, prompt_tokens: int, max_tokens: int, prompt_param: str) -> None:
        limit = self.max_model_len
        if prompt_tokens >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your request has "
                              f"{prompt_tokens} input tokens. Please reduce the length of the input.",
                              prompt_param, "context_length_exceeded")
        if prompt_tokens + max_tokens > limit:
            raise bad_request(f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is "
                              f"{limit} tokens and your request has {prompt_tokens} input tokens "
                              f"({max_tokens} > {limit} - {prompt_tokens}).", "max_tokens", "context_length_exceeded")

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are out of vocabulary: ids must be >= 0 and < {self.vocab_size}",
                              param, "invalid_token_id")

    def logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        if not bias:
            return ()
        bad = []
        out = []
        for key, value in bias.items():
            token = int(key) if key.lstrip("-").isdigit() else None
            if token is None or not 0 <= token < self.vocab_size or not -100.0 <= value <= 100.0:
                bad.append(key)
            else:
                out.append((token, float(value)))
        if bad:
            raise bad_request(f"logit_bias keys must be token ids in [0, {self.vocab_size}) with values in [-100, 100]; "
                              f"invalid: {bad}", "logit_bias", "invalid_logit_bias")
        return tuple(out)

    @staticmethod
    def check_unsupported(presence_penalty: float, frequency_penalty: float) -> None:
        if presence_penalty or frequency_penalty:
            param = "presence_penalty" if presence_penalty else "frequency_penalty"
            raise bad_request(f"{param} is not supported by this server; leave it at 0", param, "unsupported_parameter")

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def sampling(self, max_tokens: int, temperature: float | None, top_p: float | None, seed: int | None,
                 stops: tuple[int, ...], top_logprobs: int = 0, bias: tuple[tuple[int, float], ...] = ()) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, seed=seed, stop_token_ids=stops,
                              top_logprobs=top_logprobs, logit_bias=bias)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> EventStream:
        """Hands the request to the engine now, so a refusal (bad input 400, full queue 429) is
        known before any response is started."""
        return self.async_engine.submit(prompt_ids, params, request_id)

    async def events(self, stream: EventStream, prompt_tokens: int, outcome: dict[str, str]) -> AsyncIterator[Event]:
        """The request's events, under the request timeout; leaving early aborts it. The caller
        puts the finish reason it reports into `outcome["reason"]` (a matched stop string is
        "stop" although the engine saw an abort); metrics are recorded when the generator closes."""
        timeout = self.settings.request_timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        generated = 0
        try:
            while stream.finished is None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                event = await asyncio.wait_for(stream.__anext__(), left)
                generated += event.token is not None
                yield event
        finally:
            await stream.aclose()
            finished = stream.finished
            reason = outcome.get("reason") or (finished.finish_reason if finished else "abort")
            self.metrics.request_finished(prompt_tokens, generated, reason, finished.times if finished else None)


def create_api(engine: Engine, settings: ApiSettings, metrics: ServerMetrics | None = None) -> FastAPI:
    from deploy import chat_route, completions_route, responses_route

    app = FastAPI(title="gptoss-ray", version="0.1.0",
                  description="OpenAI-compatible API for gpt-oss on a Ray cluster")
    api = Api(engine, settings, metrics or ServerMetrics(engine, settings.model_name))
    app.state.api = api
    errors.install(app)
    install_middleware(app, settings.api_key, settings.max_body_bytes)

    @app.get("/health", responses={503: ERROR_RESPONSES[503]})
    def health() -> JSONResponse:
        if not engine.healthy:
            raise APIError(503, engine.last_error or "the engine is not healthy", "server_error", None,
                           "engine_unavailable", {"Retry-After": str(errors.RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    def metrics_route() -> Response:
        return Response(api.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=api.created)])

    chat_route.install(app, api)
    completions_route.install(app, api)
    responses_route.install(app, api)
    _document_model_name(app, settings.model_name)
    return app


def _document_model_name(app: FastAPI, name: str) -> None:
    """The schema names the one model this server serves (other names get 404, as OpenAI's do)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for component in schema.get("components", {}).get("schemas", {}).values():
                model = component.get("properties", {}).get("model")
                if model is not None and "Request" in component.get("title", ""):
                    model["enum"] = [name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
