"""One request's run through the engine as a route sees it, written once for every route: its token
events under the request timeout, an engine error raised as EngineUnavailable, the finish reason
(a matched stop string ends as "stop" although the engine saw an abort), usage, and the request's
metrics recorded once when it closes. Closing before the end aborts the request, freeing its KV.

    async with service.start(prompt_ids, params, request_id) as run:
        async for event in run:            # token events only
            ...
            if stop_string_matched:
                run.stop()
                break
        run.finish_reason, run.generated
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

from cluster.engine import EngineUnavailable, Event
from deploy.engine_client import EventStream
from deploy.metrics import ServerMetrics
from deploy.protocol import Usage


class Generation:
    def __init__(self, stream: EventStream, prompt_tokens: int, timeout_s: float | None,
                 metrics: ServerMetrics) -> None:
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._metrics = metrics
        self._stopped = False
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        """The next generated token's event; StopAsyncIteration at the end, EngineUnavailable when the
        request failed, TimeoutError past the request timeout."""
        if self._stopped or self.stream.finished is not None:
            raise StopAsyncIteration
        left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        event = await asyncio.wait_for(self.stream.__anext__(), left)
        if event.finish_reason == "error":
            raise EngineUnavailable(event.error or "generation failed")
        if event.token is None:
            raise StopAsyncIteration
        self.generated += 1
        return event

    def stop(self) -> None:
        """A stop string matched: the request ends here with finish reason "stop"."""
        self._stopped = True

    @property
    def stopped_by_string(self) -> bool:
        return self._stopped

    @property
    def finish_reason(self) -> str:
        if self._stopped:
            return "stop"
        finished = self.stream.finished
        return finished.finish_reason or "stop" if finished is not None else "abort"

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.generated,
                     total_tokens=self.prompt_tokens + self.generated)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.stream.aclose()
        finished = self.stream.finished
        self._metrics.request_finished(self.prompt_tokens, self.generated, self.finish_reason,
                                       finished.times if finished else None)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
