"""The engine as asyncio sees it.

The engine runs its loop in a thread and hands each request's events to a callback; here that
callback moves them onto the event loop. Closing a stream before its finish event (the client went
away, the request timed out, a stop string matched) aborts the request, which frees its KV.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from cluster.engine.engine import Engine
from cluster.engine.events import Event
from model_shards.sampling import SamplingParams


class EventStream:
    """One request's events. Use with contextlib.aclosing (or call aclose) so leaving early aborts."""

    def __init__(self, engine: Engine, request_id: str, queue: asyncio.Queue[Event]) -> None:
        self.engine = engine
        self.request_id = request_id
        self._queue = queue
        self.finished: Event | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self.finished is not None:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finish_reason is not None:
            self.finished = event
        return event

    def abort(self) -> None:
        """Ends the request unless it has ended (its KV is freed at the next step)."""
        if self.finished is None:
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               leader: str | None = None) -> EventStream:
        """Raises at once for a request that cannot be accepted (bad input, full queue). `leader`: see
        Engine.submit."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            if not loop.is_closed():  # a client whose loop is gone has stopped listening
                loop.call_soon_threadsafe(queue.put_nowait, event)

        self.engine.submit(prompt_ids, params, request_id, sink=sink, leader=leader)
        return EventStream(self.engine, request_id, queue)
