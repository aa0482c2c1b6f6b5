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
from typing import AsyncIterator, Callable, TypeVar

from cluster.engine.events import EngineUnavailable, Event
from deploy.server.engine_client import EventStream
from deploy.server.metrics import ServerMetrics
from deploy.server.protocol import PromptTokensDetails, Usage

T = TypeVar("T")


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
    def cached_tokens(self) -> int:
        """Prompt tokens whose KV came from the prefix cache (known once the request ended)."""
        finished = self.stream.finished
        return finished.cached_tokens if finished is not None else 0

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


async def until_stopped(run: Generation, feed: Callable[[Event], T],
                        stopped: Callable[[], bool]) -> AsyncIterator[T]:
    """Drive `run` to its end and close it: feed(event) for each token event, as they come; once
    `stopped()` says a stop string matched (asked after each feed), the run ends there."""
    async with run:
        async for event in run:
            yield feed(event)
            if stopped():
                run.stop()
                break


def usage(prompts: list[Generation], runs: list[Generation]) -> Usage:
    """Usage of a request: every prompt counted once (`prompts`: one run per prompt, the one whose
    prefix-cache hit is reported), the tokens of every run (choice)."""
    prompt = sum(r.prompt_tokens for r in prompts)
    generated = sum(r.generated for r in runs)
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(r.cached_tokens for r in prompts)))


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of several async iterators as they come (each one's in its order); the first
    exception of any ends the whole."""
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
        except Exception as exc:
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            _, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                left -= 1
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
