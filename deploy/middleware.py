"""ASGI middleware of the API: the API key on /v1 routes, the body-size limit, X-Request-Id.

Body size is counted on the bytes actually received (the middleware reads the body before the app
does), so a chunked upload without Content-Length is caught too; a malformed Content-Length is
refused before anything is read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.errors import APIError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class PayloadTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes",
                         "invalid_request_error", None, "content_too_large")


async def _send_error(scope: Scope, send: Send, error: APIError) -> None:
    await error.response()(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class GuardMiddleware:
    """Runs before FastAPI: authentication, body limit, request id."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Compare digests in constant time; the key itself is never kept in a printable form.
        self._key_digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._key_digest is not None and scope.get("path", "").startswith("/v1"):
            given = hashlib.sha256(headers.get("authorization", "").encode()).digest()
            if not hmac.compare_digest(given, self._key_digest):
                await _send_error(scope, send, APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                                 "authentication_error", None, "invalid_api_key"))
                return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(scope, send, APIError(400, "invalid Content-Length header", "invalid_request_error",
                                                 None, "invalid_content_length"))
                return
            if int(length) > self.max_body_bytes:
                await _send_error(scope, send, PayloadTooLarge(self.max_body_bytes))
                return
        request_id = headers.get("x-request-id")
        echo = request_id if request_id and _REQUEST_ID.match(request_id) else None
        # Read the body here (FastAPI reads it whole anyway): an upload over the limit is refused
        # before the app runs, Content-Length or not.
        chunks: list[bytes] = []
        received = 0
        more = scope.get("method") in ("POST", "PUT", "PATCH")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > self.max_body_bytes:
                await _send_error(scope, send, PayloadTooLarge(self.max_body_bytes))
                return
            more = message.get("more_body", False)
        body: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return body.pop() if body else await receive()  # then disconnects, for streaming responses

        async def send_with_id(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", echo.encode())]}
            await send(message)

        await self.app(scope, replay, send_with_id)


def install_middleware(app: FastAPI, api_key: str | None, max_body_bytes: int) -> None:
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
