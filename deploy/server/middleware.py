"""ASGI middleware of the API: header limits, the API key, the body-size limit, X-Request-Id.

Body size is counted on the bytes actually received (the middleware reads the body before the app
does), so a chunked upload without Content-Length is caught too; a malformed Content-Length is
refused before anything is read.

Headers: at most MAX_HEADERS of them and MAX_HEADER_BYTES in all (uvicorn's own limit is 16 KiB per
header block in h11; vLLM serves through uvicorn with it), else 431. A client's X-Request-Id is echoed
only when it is a short plain token; otherwise the server makes its own.

Behind Ray Serve's HTTP proxy, the proxy answers with an X-Request-Id of its own (echoing the client's
verbatim): `proxy_middlewares` (set as the proxy's middleware callback, RAY_SERVE_HTTP_PROXY_CALLBACK_
IMPORT_PATH=deploy.server.middleware:proxy_middlewares, which `gptoss serve` does) applies the same header
limits there, drops an unacceptable client id before the proxy sees it, and sends one X-Request-Id.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deploy.server.errors import APIError

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 << 10
REQUEST_ID = b"x-request-id"


class PayloadTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes",
                         "invalid_request_error", None, "content_too_large")


def header_problem(scope: Scope) -> APIError | None:
    raw = scope.get("headers", [])
    size = sum(len(k) + len(v) + 4 for k, v in raw)
    if len(raw) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        return APIError(431, f"request headers too large: {len(raw)} headers, {size} bytes (the limits are "
                             f"{MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes)", "invalid_request_error", None,
                        "request_header_fields_too_large")
    return None


def acceptable_request_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == REQUEST_ID:
            text = value.decode("latin-1")
            return text if _REQUEST_ID.match(text) else None
    return None


async def _send_error(scope: Scope, send: Send, error: APIError) -> None:
    await error.response()(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class GuardMiddleware:
    """Runs before FastAPI: header limits, authentication, body limit, request id."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Compare digests in constant time; the key itself is never kept in a printable form.
        self._key_digest = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = header_problem(scope)
        if problem is not None:
            await _send_error(scope, send, problem)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # The key guards /v1, as vLLM's does, and /admin: /health, /metrics and the schema (/openapi.json) stay open.
        if self._key_digest is not None and scope.get("path", "").startswith(("/v1", "/admin")):
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
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope.get("method") == "POST" and kind != "application/json":
            await _send_error(scope, send, APIError(400, f"Content-Type must be application/json, not "
                                                         f"{kind or 'missing'}", "invalid_request_error", None,
                                                    "invalid_content_type"))
            return
        echo = acceptable_request_id(scope)
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
            if body:
                return body.pop()
            try:  # then only disconnects, which a streaming response listens for
                return await receive()
            except Exception:  # Ray Serve cancels the call when the client left: that is a disconnect
                return {"type": "http.disconnect"}

        async def send_with_id(message: Message) -> None:
            if echo and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REQUEST_ID, echo.encode())]}
            await send(message)

        await self.app(scope, replay, send_with_id)


class ProxyGuard:
    """In Ray Serve's HTTP proxy, around its request-id middleware: header limits, an acceptable client
    request id or none (the proxy then makes one), and a single X-Request-Id on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = header_problem(scope)
        if problem is not None:
            await _send_error(scope, send, problem)
            return
        if acceptable_request_id(scope) is None:
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() != REQUEST_ID]}

        async def one_request_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen, headers = False, []
                for key, value in message.get("headers", []):
                    if key.lower() == REQUEST_ID:
                        if seen:
                            continue
                        seen = True
                    headers.append((key, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, one_request_id)


def proxy_middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyGuard)]


def install_middleware(app: FastAPI, api_key: str | None, max_body_bytes: int) -> None:
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes)
