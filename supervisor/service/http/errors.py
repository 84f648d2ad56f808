"""Errors as OpenAI's clients expect them: a status, and the body
``{"error": {"message", "type", "param", "code"}}``.

The OpenAI SDKs pick their exception class by status (400 ``BadRequestError``,
401 ``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx
``InternalServerError``...) and show ``message``; ``code`` carries gpuvisor's
own error code, so a caller can still tell a ``job_timeout`` from a
``worker_crashed`` without parsing text.

What leaves the machine is a code, a short message and, for a 5xx, an error
id: a worker's stderr, a traceback, a path or a loader's complaint stays in
the daemon's log, under that id (``incident``). A handler that refused its
input (a 400) keeps the first line of its message, cut short: the caller
needs it to mend the request.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from protocol import (
    Forbidden,
    GpuvisorError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    ModeBroken,
    NoModeLoaded,
    OutOfMemory,
    ProtocolError,
    QueueFull,
    RequestTooLarge,
    ShuttingDown,
    SupervisorFailed,
    UnknownMode,
    UnknownTask,
)

log = logging.getLogger("gpuvisor")

_INVALID_REQUEST = (400, 401, 403, 404, 406, 408, 409, 413, 415, 431)
_TYPES = dict.fromkeys(_INVALID_REQUEST, "invalid_request_error")
_TYPES |= {429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}
"""OpenAI's error ``type`` for each status; any other is a ``server_error``."""

REFUSED_INPUT = ("TypeError", "ValueError")
"""A handler that raises one of these refused its payload: the caller's
input, so a 400 (the built-in modes check their payloads this way)."""

LOGGED = "_gpuvisor_logged"  # set on an exception whose traceback is in the log already

SHORT = 200  # the most characters of a handler's own message a 4xx repeats

# What a 5xx says, by code; the details are in the log under the error id.
_GENERIC = {
    "worker_crashed": "the worker died while running this job",
    "out_of_memory": "the worker ran out of memory running this job",
    "job_failed": "the task failed",
    "mode_load_error": "the model's mode could not be loaded",
    "mode_broken": "the model's mode keeps failing, so it is not tried again for now",
    "job_timeout": "the job ran past its timeout and was stopped",
    "supervisor_failed": "the supervisor has failed: no job runs until an operator restarts it",
    "shutting_down": "the daemon is shutting down: it takes no new jobs",
    "job_cancelled": "the job was cancelled by a stop before it ended",
}


def body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def short(text: str) -> str:
    """The first line of ``text``, at most ``SHORT`` characters: never a traceback."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= SHORT else line[: SHORT - 1] + "…"


class ApiError(Exception):
    """An answer other than 200, raised anywhere in a route."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return body(self.status, self.message, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_SEEN: OrderedDict[str, str] = OrderedDict()  # details -> its error id, for what is asked about again and again
_SEEN_MAX = 64
_TOLD = 2000  # the most characters of a failure an operator is told


def incident(what: str, details: str, *, once: bool = False) -> str:
    """Log ``details`` under a new error id and return the id, which the
    answer carries instead of them. ``once``: the same details keep their
    first id and are logged once (a probe asking every few seconds about the
    same failure must not fill the log)."""
    if once and details in _SEEN:
        _SEEN.move_to_end(details)
        return _SEEN[details]
    error_id = secrets.token_hex(6)
    log.error("HTTP error %s: %s: %s", error_id, what, details)
    if once:
        _SEEN[details] = error_id
        while len(_SEEN) > _SEEN_MAX:
            _SEEN.popitem(last=False)
    return error_id


def _details(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, GpuvisorError) else f"{type(exc).__name__}: {exc}"
    trace = getattr(exc, "traceback", "")
    return f"{text}\n{trace}" if isinstance(trace, str) and trace else text


def status_of(exc: BaseException) -> int:
    """Where a job's typed error maps to: 400 input the handler refused, 403
    not this caller's to ask, 413 more than the door or a frame can carry,
    429 the queue is full, 503 shutting down, failed, broken (or cancelled
    by a stop), 504 past its timeout, else 500."""
    if isinstance(exc, JobFailed) and not isinstance(exc, OutOfMemory):
        if exc.remote_type in REFUSED_INPUT:
            return 400
        if exc.remote_type in ("ProtocolError", "RequestTooLarge"):  # an answer over the frame limit
            return 413
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, RequestTooLarge | ProtocolError):  # ProtocolError: only submit() raises it here
        return 413
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, ShuttingDown | SupervisorFailed | JobCancelled | ModeBroken):
        return 503
    if isinstance(exc, JobTimeout):
        return 504
    return 500


def from_job(exc: BaseException, *, operator: bool = False) -> ApiError:
    """The answer for a job that ended in ``exc`` (or a submit that raised it).
    ``operator``: the caller asked for it on an admin route, and is told why
    it failed, as ``gpuvisor switch`` tells (the worker's last stderr lines
    included); any other caller gets an error id, the details in the log."""
    if isinstance(exc, TypeError | ValueError):  # submit() refused the arguments (a payload msgpack cannot carry)
        return ApiError(400, short(str(exc)) or "the request cannot be sent to the worker")
    status = status_of(exc)
    code = exc.code if isinstance(exc, GpuvisorError) else None
    if status == 413:
        message = "the request or its answer is over what one job may carry (the frame limit)"
        return ApiError(413, f"{message}: send fewer or shorter inputs", "request_too_large")
    if status < 500:
        return ApiError(status, short(exc.message if isinstance(exc, GpuvisorError) else str(exc)), code)
    if operator and isinstance(exc, GpuvisorError):
        told = " | ".join(line.strip() for line in exc.message.strip().splitlines() if line.strip())
        log.warning("HTTP admin order failed: %s", told)
        return ApiError(status, told[:_TOLD], code)
    generic = _GENERIC.get(code or "", "the server could not answer this request")
    error_id = incident(code or type(exc).__name__, _details(exc))
    headers = {}
    if isinstance(exc, ModeBroken):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_in)))
    return ApiError(status, f"{generic} (error id {error_id})", code, headers=headers)


def from_named(exc: BaseException, *, operator: bool = False) -> ApiError:
    """``from_job``, where the caller named the mode and the task (``/v1/jobs``,
    the admin routes): naming one that does not exist is its mistake, a 404,
    not the server's; a job naming no mode while none is loaded, a 409."""
    if isinstance(exc, UnknownMode | UnknownTask):
        return ApiError(404, short(exc.message), exc.code, "mode" if isinstance(exc, UnknownMode) else "task")
    if isinstance(exc, NoModeLoaded):
        return ApiError(409, "no mode is loaded: name the task's mode in 'mode'", exc.code, "mode")
    return from_job(exc, operator=operator)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug on this side: a 500 with an error id, the traceback in the log."""
    error_id = secrets.token_hex(6)
    log.error("HTTP error %s: %s %s raised", error_id, request.method, request.url.path, exc_info=exc)
    try:
        setattr(exc, LOGGED, True)  # Starlette raises it again, for the server to log: said once is enough
    except AttributeError:
        pass
    return ApiError(500, f"the server could not answer this request (error id {error_id})").response()


def invalid(errors: Sequence[Any]) -> ApiError:
    """pydantic's complaint (``errors()``), as one readable line naming the field."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not JSON: {first.get('ctx', {}).get('error', 'invalid')}")
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg', 'invalid')}"
        for e in errors[:5]
    )
    return ApiError(400, short(message) or "the request body is not valid", param=".".join(where)[:SHORT] or None)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return invalid(exc.errors()).response()


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own (no such path, wrong method, a body that is not JSON)."""
    assert isinstance(exc, HTTPException)
    return ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()
