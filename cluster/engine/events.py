"""What the engine tells the submitter of a request: its events, in order, ending with a finish event;
and the errors that refuse a request."""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Callable

from model_shards.requests import Completion

log = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineUnavailable(RuntimeError):
    """The engine cannot run requests (it failed to recover, or is shut down)."""


@dataclass
class RequestTimes:
    arrival: float
    scheduled: float | None = None  # first step that ran any of its tokens
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class Event:
    request_id: str
    token: int | None = None  # a generated token, or None on the final event
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort | error, on the last event
    error: str | None = None
    times: RequestTimes | None = None  # on the last event: when it arrived, was scheduled, produced tokens
    cached_tokens: int = 0  # on the last event: prompt tokens whose KV came from the prefix cache
    replica: int | None = None  # on the last event: the attention replica that ran it (last)


class RequestHandle:
    """What submit() returns: the request's events, in order, ending with a finish event."""

    def __init__(self, request_id: str, prompt_ids: list[int], sink: Callable[[Event], None] | None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.events: queue.Queue[Event] = queue.Queue()
        self._sink = sink or self.events.put

    def emit(self, event: Event) -> None:
        try:
            self._sink(event)
        except Exception as exc:  # the consumer is gone (its event loop closed...): never the engine's problem
            log.warning("dropped an event for %s: %s", self.request_id, exc)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request ends (only for handles without a custom sink)."""
        tokens, logprobs = [], []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            if event.token is not None:
                tokens.append(event.token)
                logprobs.append(event.logprob)
            if event.finish_reason is not None:
                if event.finish_reason == "error":
                    raise EngineUnavailable(event.error or "request failed")
                return Completion(self.prompt_ids, tokens, logprobs, event.finish_reason, event.cached_tokens,
                                  event.replica)
