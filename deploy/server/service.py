"""What every route shares: the engine behind its asyncio bridge, the server's settings and metrics,
and the few rules that are the same on every route (model name, default max_tokens, sampling
parameters, starting a request). Routes get it with `Depends(get_service)`."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass

from fastapi import Request

from cluster.engine.engine import Engine
from deploy.server.engine_client import AsyncEngine
from deploy.server.errors import APIError
from deploy.server.generation import Generation
from deploy.server.metrics import ServerMetrics
from deploy.server.store import MEMORY, open_store
from model_shards.requests import InvalidRequest
from model_shards.sampling import SamplingParams, new_seed


@dataclass(frozen=True)
class ApiSettings:
    model_name: str
    api_key: str | None = None  # required on /v1/* when set
    max_body_bytes: int = 4 << 20
    request_timeout_s: float | None = None  # None: requests may run as long as they need
    default_max_tokens: int = 4096  # when a chat or responses request gives none (KV is reserved for all of it)
    docs: bool = False  # serve /docs and /redoc
    response_store: str = MEMORY  # store.open_store: off, memory, redis://..., or a SQLite file
    response_ttl_s: float = 30 * 86400.0
    response_store_max: int = 10_000


class ApiService:
    def __init__(self, engine: Engine, settings: ApiSettings, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.async_engine = AsyncEngine(engine)
        self.settings = settings
        self.metrics = metrics
        self.created = int(time.time())
        self.vocab_size = engine.model_config.vocab_size
        self.store = open_store(settings.response_store, settings.response_ttl_s, settings.response_store_max)
        self.background: set[asyncio.Task[None]] = set()  # background responses running (kept referenced)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "not_found_error", "model", "model_not_found")

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """For requests that give none: the server's default, or what is left of the context."""
        return max(1, min(self.settings.default_max_tokens, self.max_model_len - prompt_tokens))

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @staticmethod
    def sampling(max_tokens: int, temperature: float | None, top_p: float | None, seed: int | None,
                 stops: tuple[int, ...], logprobs: bool = False, top_logprobs: int = 0,
                 bias: tuple[tuple[int, float], ...] = (), controls: dict[str, float | int] | None = None,
                 grammar: str | None = None) -> SamplingParams:
        """Log-probs are computed only when the client asks for them (a pass over the vocabulary).
        `controls`: penalties, top_k, min_p, min_tokens (SamplingControls.controls); `grammar`: a
        structured output's (deploy/server/structured.py)."""
        controls = controls or {}
        if int(controls.get("min_tokens", 0)) > max_tokens:
            raise InvalidRequest(f"min_tokens ({controls['min_tokens']}) is more than max_tokens ({max_tokens})",
                                 "min_tokens")
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                              top_p=1.0 if top_p is None else top_p, seed=seed, stop_token_ids=stops,
                              top_logprobs=top_logprobs, logit_bias=bias, logprobs=logprobs, grammar=grammar,
                              **controls)

    def start(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
              names: dict[str, str] | None = None, leader: str | None = None) -> Generation:
        """Hands the request to the engine now, so that a refusal (bad input 400, full queue 429) is
        known before any response starts. `names` renames the engine's `param` of an invalid request
        to the route's own field (chat: prompt -> messages)."""
        try:
            stream = self.async_engine.submit(prompt_ids, params, request_id, leader)
        except InvalidRequest as exc:
            if names and exc.param in names:
                exc.param = names[exc.param]
            raise
        return Generation(stream, len(prompt_ids), self.settings.request_timeout_s, self.metrics)

    def start_choices(self, prompts: list[list[int]], params: SamplingParams, request_id: str, n: int = 1,
                      names: dict[str, str] | None = None) -> list[Generation]:
        """`n` choices of every prompt, prompt-major (choice index = prompt * n + i). Choice i samples
        with seed + i (the request's seed, or one drawn per prompt), so each is reproducible alone; the
        choices after the first share the first one's prompt KV. All or nothing: a refusal ends the
        ones already started."""
        runs: list[Generation] = []
        try:
            for j, prompt in enumerate(prompts):
                base = params.seed if params.seed is not None else new_seed()
                leader = None
                for i in range(n):
                    run = self.start(prompt, dataclasses.replace(params, seed=base + i), f"{request_id}-{j * n + i}",
                                     names, leader)
                    leader = leader or run.stream.request_id
                    runs.append(run)
        except BaseException:
            for run in runs:
                run.stream.abort()
            raise
        return runs


def get_service(request: Request) -> ApiService:
    service: ApiService = request.app.state.service
    return service
