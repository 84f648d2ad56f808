"""Errors as OpenAI's clients expect them: a status, and the body
``{"error": {"message", "type", "param", "code"}}``.

The OpenAI SDKs pick their exception class by status (400 ``BadRequestError``,
401 ``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx
``InternalServerError``...) and show ``message``; ``code`` carries gpuvisor's
own error code, so a caller can still tell a ``job_timeout`` from a
``worker_crashed`` without parsing text.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from protocol import (
    GpuvisorError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    OutOfMemory,
    QueueFull,
    ShuttingDown,
    SupervisorFailed,
)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}  # fmt: skip

REFUSED_INPUT = ("TypeError", "ValueError")
"""A handler that raises one of these refused its payload: the caller's
input, so a 400 (the built-in modes check their payloads this way)."""


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


class ApiError(Exception):
    """An answer other than 200, raised anywhere in a route."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        return JSONResponse(body(self.status, self.message, self.code, self.param), status_code=self.status)


def status_of(exc: BaseException) -> int:
    """Where a job's typed error maps to: 400 input the handler refused, 429
    the queue is full, 503 shutting down or failed (or cancelled by a stop),
    504 past its timeout, else 500."""
    if isinstance(exc, JobFailed) and not isinstance(exc, OutOfMemory) and exc.remote_type in REFUSED_INPUT:
        return 400
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, ShuttingDown | SupervisorFailed | JobCancelled):
        return 503
    if isinstance(exc, JobTimeout):
        return 504
    return 500


def from_job(exc: BaseException) -> ApiError:
    """The answer for a job that ended in ``exc`` (or a submit that raised it)."""
    if isinstance(exc, GpuvisorError):
        return ApiError(status_of(exc), exc.message, exc.code)
    if isinstance(exc, TypeError | ValueError):  # submit() refused the arguments (a payload msgpack cannot carry)
        return ApiError(400, str(exc))
    return ApiError(500, f"{type(exc).__name__}: {exc}")


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """pydantic's complaint, as one readable line naming the field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not JSON: {first.get('ctx', {}).get('error', 'invalid')}").response()
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}"
        for e in errors[:5]
    )
    return ApiError(400, message or "the request body is not valid", param=".".join(where) or None).response()


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own (no such path, wrong method, a body that is not JSON)."""
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, str(exc.detail)).response()
