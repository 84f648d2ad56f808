"""``POST /v1/jobs``: any task of any mode over HTTP, what ``submit()``
takes, for the tasks no OpenAI route fits (a score, a batch of images, a
stream of anything).

The body is ``{"mode"?, "task", "payload"?, "timeout"?, "retries"?,
"stream"?}``; a field it does not know is refused rather than dropped (a
misspelt ``payload`` would run the task on nothing). The answer is the
result in the form ``Accept`` asks for (``results.py``), or with
``stream: true`` server-sent events: ``{"chunk": ...}`` per chunk, then
``{"result": ...}`` or ``{"error": ...}``, then ``[DONE]``.

``timeout`` is the caller's patience, as on the ZeroMQ door: ``[http]
timeout`` is the operator's ceiling and the only one that stops a worker; a
caller that asks for less gets a ``job_timeout`` then, and the worker
finishes the job for nobody (one caller's haste must not cost everyone a
worker); more than the ceiling, or none, is the ceiling.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from supervisor.api import Supervisor
from supervisor.service.http import jobs, results
from supervisor.service.http.accept import choose, not_acceptable
from supervisor.service.http.admission import Door
from supervisor.service.http.errors import ApiError, from_named, short
from supervisor.service.http.openai import describe, parse

EVENTS = "text/event-stream"
WHOLE = (results.JSON, results.MSGPACK, *results.MSGPACK_ALIASES, results.NPY)
STREAMED = (EVENTS, results.JSON)  # an SDK that asks for JSON reads the events as OpenAI's streams are read
MAX_RETRIES = 10  # a job that kills its worker each time costs everyone a reload per retry


class JobRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    task: str = Field(min_length=1, max_length=256)
    mode: str | None = Field(default=None, min_length=1, max_length=256)
    payload: Any = None
    timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    retries: int = Field(default=0, ge=0, le=MAX_RETRIES)
    stream: bool = False


def add_routes(app: FastAPI, sup: Supervisor, door: Door) -> None:
    @app.post("/v1/jobs", openapi_extra=_schema())
    async def run_job(request: Request) -> Response:
        body = parse(JobRequest, await jobs.read_body(request), door.settings)
        _check_task(sup, body.mode, body.task)
        accept = request.headers.get("accept")
        forms = choose(accept, STREAMED if body.stream else WHOLE)
        if not forms:
            raise not_acceptable(accept, STREAMED if body.stream else WHOLE)
        stream, task, payload, terms = body.stream, body.task, body.payload, _terms(body, door.settings.timeout)
        del body  # the payload is all the job needs
        if stream:
            job = jobs.Stream(sup, request, task, payload, terms)
            first = await job.first(request)
            return jobs.JobStreamResponse(_events(job, first), job, request)
        result = await jobs.run(sup, request, task, payload, terms)
        media = next((m for m in forms if m != results.NPY or isinstance(result, np.ndarray)), None)
        if media is None:
            why = f" (application/x-npy is for a result that is an array; this one is {describe(result)})"
            raise not_acceptable(accept, WHOLE, why)
        content = await _encoded({"result": result} if media == results.JSON else result, media)
        return Response(content, media_type=media)


def _check_task(sup: Supervisor, mode: str | None, task: str) -> None:
    """Refuse a mode the configuration lacks, and a task its mode is known
    to lack (known once it has loaded), before anything is queued."""
    if mode is None:
        return
    modes = sup.modes()
    if mode not in modes:
        message = f"unknown mode {mode!r}; the modes are {', '.join(sorted(modes))}"
        raise ApiError(404, short(message), "unknown_mode", "mode")
    tasks = modes[mode]["tasks"]
    if tasks is not None and task not in tasks:
        message = f"the mode {mode!r} has no task {task!r}; its tasks are {', '.join(sorted(tasks))}"
        raise ApiError(404, short(message), "unknown_task", "task")


def _terms(body: JobRequest, ceiling: float) -> jobs.Terms:
    asked = body.timeout
    patience = asked if asked and (not ceiling or asked < ceiling) else None
    return jobs.Terms(body.mode, ceiling, body.retries, patience, from_named)


async def _encoded(value: Any, media: str) -> bytes:
    """``value`` in the form ``media``: here when small, else on a thread,
    so a large result never holds up the event loop."""
    if results.small(value):
        return results.encode(value, media)
    return await run_in_threadpool(results.encode, value, media)


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def _events(stream: jobs.Stream, first: Any) -> AsyncIterator[bytes]:
    """``{"chunk": ...}`` per chunk, then ``{"result": ...}`` or
    ``{"error": ...}``, then ``[DONE]``. A chunk with no JSON form ends the
    stream with that error (the job is given up as the response ends)."""
    try:
        async for chunk in stream.rest(first):
            yield _event(await _encoded({"chunk": chunk}, results.JSON))
        yield _event(await _encoded({"result": stream.outcome()}, results.JSON))
    except ApiError as failure:
        yield _event(results.as_json(failure.body()))
    yield _event(b"[DONE]")


def _schema() -> dict[str, Any]:
    """The route's request body in the OpenAPI schema (not served; the fuzz tests draw bodies from it)."""
    content = {"application/json": {"schema": JobRequest.model_json_schema()}}
    return {"requestBody": {"required": True, "content": content}}
