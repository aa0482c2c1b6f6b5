"""The one mapping from exceptions to HTTP statuses and OpenAI error bodies.

Every error leaves as {"error": {"message", "type", "param", "code"}} with the right status: bad
input is 400 (never 500: SDKs retry 5xx), authentication 401, unknown model 404, timeouts 408,
oversized bodies 413, overload 429 with Retry-After, an engine that cannot serve 503. Messages are
ours or the validator's; tracebacks, file paths and object addresses never reach a client.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.engine.events import EngineOverloaded, EngineUnavailable
from cluster.engine.executor import ResizeRefused
from model_shards.chat import ChatFormatError
from model_shards.requests import InvalidRequest

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": _ADDRESS.sub("", self.message), "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def to_api_error(exc: BaseException) -> APIError:
    """Any exception -> the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, ChatFormatError):
        return APIError(400, str(exc), "invalid_request_error", "messages")
    if isinstance(exc, ResizeRefused):  # counts that cannot work, another resize under way, the local engine
        return APIError(400, str(exc), "invalid_request_error", None, "resize_refused")
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), "rate_limit_error", None, "server_overloaded",
                        {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineUnavailable):
        return APIError(503, str(exc), "server_error", None, "engine_unavailable",
                        {"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, TimeoutError):
        return APIError(408, "the request took longer than the server's request timeout", "timeout_error", None,
                        "request_timeout")
    if isinstance(exc, StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        headers = dict(exc.headers or {})
        return APIError(exc.status_code, str(exc.detail), kind, None, None, headers)
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return APIError(500, "internal server error", "server_error", None, "internal_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    location = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid" or not location and first.get("type") in ("missing", "model_attributes_type",
                                                                                        "dict_type"):
        return bad_request("the request body must be a JSON object", None, "invalid_json")
    param = location[0] if location else None
    messages = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                for e in errors[:5]]
    return bad_request("; ".join(messages), param)


def install(app: FastAPI) -> None:
    """Route every error of the app through to_api_error."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    # Known classes are answered where they are raised; only the catch-all goes through
    # Starlette's server-error path (which also logs the exception).
    for cls in (RequestValidationError, StarletteHTTPException, APIError, InvalidRequest, ChatFormatError,
                ResizeRefused, EngineOverloaded, EngineUnavailable, TimeoutError, Exception):
        app.add_exception_handler(cls, handle)

