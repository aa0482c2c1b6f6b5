"""Server-sent events, written once for every streaming route: each chunk a pydantic model as
`data: {json}`, an error after the stream started as an in-band error event (the status line already
said 200), and `data: [DONE]` at the end. The Responses API's stream instead names each event
(`event: response.output_text.delta`) by its `type`, and has no [DONE]."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from deploy.server.errors import to_api_error

MEDIA_TYPE = "text/event-stream"
DONE = "data: [DONE]\n\n"
STREAM_RESPONSE = {200: {"content": {MEDIA_TYPE: {}}, "description": "a completion, or SSE with stream=true"}}


def event(chunk: BaseModel) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"


def named_event(chunk: BaseModel) -> str:
    return f"event: {getattr(chunk, 'type')}\n{event(chunk)}"


def error_event(exc: BaseException) -> str:
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"


async def _frames(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as exc:  # the stream already said 200: the error goes in-band
        yield error_event(exc)
    yield DONE


async def _named_frames(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    async for chunk in chunks:  # errors are the route's own events here
        yield named_event(chunk)


def sse_response(chunks: AsyncIterator[BaseModel], named: bool = False) -> StreamingResponse:
    """`named`: the Responses API's stream (events named by their `type`, no [DONE])."""
    return StreamingResponse(_named_frames(chunks) if named else _frames(chunks), media_type=MEDIA_TYPE)
