"""The HTTP routes: OpenAI's embeddings, chat and completions, the models
list, any task (``native.py``), the operator's routes (``admin.py``), a
health probe and Prometheus metrics, all over the daemon's one
``Supervisor`` (one queue, one scheduler: an HTTP job waits its turn like
any other, and a model in another mode switches as a job naming its mode
does).

A request's ``model`` is a name in ``[http.models]``, which says the mode
and the task each endpoint runs. Streams are server-sent events, one per
chunk the worker yields, ending in ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from supervisor.api import Supervisor
from supervisor.config_http import HttpModel
from supervisor.service.glance import Glance
from supervisor.service.http import admin, errors, jobs, native, openai, ui
from supervisor.service.http.admission import Door
from supervisor.service.http.errors import ApiError
from supervisor.service.operators import Operators

T = TypeVar("T")
ENDPOINTS = {"embeddings": "/v1/embeddings", "chat": "/v1/chat/completions", "completions": "/v1/completions"}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(
    sup: Supervisor,
    door: Door,
    operators: Operators | None = None,
    reload: admin.Reload | None = None,
    glance: Glance | None = None,
) -> FastAPI:
    """The routes. ``operators`` says who is one on a unix socket (default:
    the daemon's own user and root); ``reload`` is the daemon's, for
    ``/v1/admin/reload`` (None: that route answers 501); ``glance`` the
    history the status page draws (None: one of its own, with no history)."""
    app = FastAPI(title="gpuvisor", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, errors.on_api_error)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)
    app.add_exception_handler(HTTPException, errors.on_http_error)
    app.add_exception_handler(jobs.ClientGone, _nobody_listens)
    app.add_exception_handler(Exception, errors.on_unexpected)

    def served(name: str, endpoint: str) -> tuple[HttpModel, str]:
        model = door.models.get(name)
        if model is None:
            message = f"the model {name!r} does not exist; GET /v1/models lists them"
            raise ApiError(404, message, "model_not_found", "model")
        task = getattr(model, endpoint)
        if task is None:
            offered = ", ".join(ENDPOINTS[e] for e in ENDPOINTS if getattr(model, e)) or "nothing"
            message = f"the model {name!r} is not served at {ENDPOINTS[endpoint]} (it is at {offered})"
            raise ApiError(400, message, "model_not_supported", "model")
        return model, task

    @app.post("/v1/embeddings", openapi_extra=_body_schema(openai.EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        limits = door.settings
        body = openai.parse(openai.EmbeddingRequest, await jobs.read_body(request), limits)
        body.refuse_unsupported()
        model, task = served(body.model, "embeddings")
        texts = body.texts(limits)
        dimensions, encoding = body.dimensions, body.encoding_format
        del body  # the payload is all the job needs
        width = door.widths.get((model.mode, task))  # known from this task's first answer
        if width is not None:
            check_width(dimensions, width)
            if not openai.answer_fits(len(texts), width):
                message = f"{len(texts)} vectors of {width} values would be over the frame limit of one answer"
                raise ApiError(413, f"{message}: send fewer inputs", "request_too_large", "input")
        payload = {"texts": texts, "details": True}
        result = await jobs.run(sup, request, task, payload, jobs.Terms(model.mode, limits.timeout_of(model)))
        expected = len(texts) * width if width is not None else None
        served_by = openai.Served(model.name, task, ENDPOINTS["embeddings"])
        array, tokens = await _off_loop_unless_small(expected, openai.vectors, result, len(texts), served_by)
        door.widths[(model.mode, task)] = array.shape[1]
        check_width(dimensions, array.shape[1])
        content = await _off_loop_unless_small(array.size, openai.embeddings, model.name, array, tokens, encoding)
        return Response(content, media_type="application/json")

    async def generation(
        request: Request, kind: type[openai.ChatRequest | openai.CompletionRequest], endpoint: str
    ) -> Response:
        limits = door.settings
        body = openai.parse(kind, await jobs.read_body(request), limits)
        body.refuse_unsupported()
        model, task = served(body.model, endpoint)
        payload = body.payload(limits, limits.max_tokens_of(model))
        stream, include_usage = body.stream, body.include_usage
        del body  # the payload is all the job needs
        reply = openai.Reply(model.name, chat=endpoint == "chat")
        served_by = openai.Served(model.name, task, ENDPOINTS[endpoint])
        terms = jobs.Terms(model.mode, limits.timeout_of(model))
        if not stream:
            result = await jobs.run(sup, request, task, payload, terms)
            return JSONResponse(reply.whole(openai.generated(result, served_by)))
        job = jobs.Stream(sup, request, task, payload, terms)
        first = await job.first(request)
        return jobs.JobStreamResponse(_events(job, first, reply, include_usage, served_by), job, request)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(openai.ChatRequest))
    async def chat(request: Request) -> Response:
        return await generation(request, openai.ChatRequest, "chat")

    @app.post("/v1/completions", openapi_extra=_body_schema(openai.CompletionRequest))
    async def completions(request: Request) -> Response:
        return await generation(request, openai.CompletionRequest, "completions")

    def listed(model: HttpModel, modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": int(door.started),
            "owned_by": "gpuvisor",
            "mode": model.mode,
            "loaded": modes[model.mode]["loaded"],
            "devices": modes[model.mode]["devices"],
            "endpoints": [ENDPOINTS[e] for e in ENDPOINTS if getattr(model, e)],
        }

    @app.get("/v1/models")
    async def models() -> Response:
        modes = sup.modes()
        return JSONResponse({"object": "list", "data": [listed(m, modes) for m in door.models.values()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        found = door.models.get(name)
        if found is None:
            message = f"the model {name[:200]!r} does not exist; GET /v1/models lists them"
            raise ApiError(404, message, "model_not_found", "model")
        return JSONResponse(listed(found, sup.modes()))

    native.add_routes(app, sup, door)
    admin.add_routes(app, sup, door, operators or Operators(), reload)
    ui.add_routes(app, sup, glance or Glance(), operators or Operators())

    @app.get("/health")
    async def health() -> Response:
        return _health(sup, door)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(sup.metrics(), media_type=CONTENT_TYPE_LATEST)

    return app


INLINE_VALUES = 4096  # an answer of up to this many values is written on the event loop: about 90 us


async def _off_loop_unless_small(values: int | None, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` for an answer of ``values`` numbers (None: not known
    yet): here when it is small, else on a thread, so that a large one never
    holds up the event loop. One sentence a request is the common case, and
    its answer takes microseconds: less than the hand-off to a thread and
    back, which under load also waits for the GIL."""
    if values is not None and values <= INLINE_VALUES:
        return work(*args)
    return await run_in_threadpool(work, *args)


def _body_schema(kind: type[BaseModel]) -> dict[str, Any]:
    """The route's request body in the OpenAPI schema (not served; the fuzz tests draw bodies from it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": kind.model_json_schema()}}}}


def check_width(dimensions: int | None, width: int) -> None:
    """``dimensions`` is only accepted when it is the width the model has:
    cutting vectors short is right for a few models only."""
    if dimensions is not None and dimensions != width:
        message = f"dimensions={dimensions}: this model's vectors have {width} values"
        raise ApiError(400, message, "unsupported", "dimensions")


async def _events(
    stream: jobs.Stream, first: Any, reply: openai.Reply, include_usage: bool, served_by: openai.Served
) -> AsyncIterator[str]:
    """One event per chunk of text, the finish reason, the usage if asked
    for, ``[DONE]``. An error after the first event can only travel inside
    the stream: the status is already sent."""
    started, sent = False, ""
    async for chunk in stream.rest(first):
        text = chunk.get("text") if isinstance(chunk, dict) else None
        text = text if isinstance(text, str) else None
        if text or (reply.chat and not started):
            yield _sse(reply.chunk(text or "", first=not started))
            started, sent = True, sent + (text or "")
    try:
        result = openai.generated(stream.outcome(), served_by)
    except ApiError as failure:
        yield _sse(failure.body())
    else:
        text = result["text"]
        if len(text) > len(sent) and text.startswith(sent):
            # A task that does not stream (or held text back) still gives the reader all of its text.
            yield _sse(reply.chunk(text[len(sent) :], first=not started))
            started = True
        yield _sse(reply.chunk(None, openai.finish_reason(result), first=not started))
        if include_usage:
            yield _sse(reply.usage_chunk(result))
    yield _sse("[DONE]")


async def _nobody_listens(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


def _health(sup: Supervisor, door: Door) -> JSONResponse:
    """200 while the daemon serves; 503, with the reason, while it drains,
    is loading its first mode (nothing ever loaded, a switch under way), has
    failed, or could not load its default mode at start: a pod that never
    loaded anything and whose configured mode is broken should leave the
    Service, as one that is still loading does. A reason carries no
    worker output and no path: those are in the log, under its error id.
    Once any mode has loaded the daemon serves again. A later switch, a
    mode stopped by ``idle_unload_s`` and a respawn after a crash are still
    serving: jobs wait in the queue; a later switch that fails is answered
    to the job or caller that asked (other modes serve on), so it keeps 200
    too."""
    status = sup.status()
    state = status["state"]
    fields: dict[str, Any] = {
        "mode": status["mode"],
        "switching_to": status["switching_to"],
        "queued": status["queued"],
        "in_flight": status["in_flight"],
    }
    devices = status["devices"]
    if len(devices) > 1:  # several: each one's, and the top-level mode is any one's that serves
        fields["devices"] = [{k: d[k] for k in ("name", "mode", "switching_to", "in_flight")} for d in devices]
        fields["mode"] = next((d["mode"] for d in devices if d["mode"]), None)
        fields["switching_to"] = next((d["switching_to"] for d in devices if d["switching_to"]), None)
    if door.draining or state in ("draining", "stopped"):
        return JSONResponse({"status": "draining", "reason": "the daemon is stopping", **fields}, status_code=503)
    broken = status.get("broken_modes") or {}
    if broken:  # named, with when each is tried again; why is in the log (a loader's error may quote paths)
        fields["broken"] = {mode: _broken(mode, entry) for mode, entry in broken.items()}
    if state == "failed":
        error_id = errors.incident("the supervisor failed", str(status["failed_reason"]), once=True)
        reason = (
            f"every mode failed too often (max_restarts) and is broken; each is tried again by itself, or "
            f"gpuvisor restart tries one now (error id {error_id})"
        )
        return JSONResponse({"status": "failed", "reason": reason, **fields}, status_code=503)
    if state != "running":
        return JSONResponse({"status": "starting", "reason": f"supervisor {state}", **fields}, status_code=503)
    if fields["mode"] is None and all(mode["tasks"] is None for mode in sup.modes().values()):
        if fields["switching_to"] is not None:
            reason = f"loading {fields['switching_to']}, the first mode since the daemon started"
            return JSONResponse({"status": "loading", "reason": reason, **fields}, status_code=503)
        error = next((d["last_error"] for d in devices if d["last_error"]), None)
        if error is not None and sup.config.default_mode:
            error_id = errors.incident("the default mode failed to load", str(error), once=True)
            reason = f"the default mode {sup.config.default_mode!r} failed to load (error id {error_id})"
            return JSONResponse({"status": "load_failed", "reason": reason, **fields}, status_code=503)
    return JSONResponse({"status": "ok", **fields})


def _broken(mode: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A broken mode as the health probe tells it: when it is tried again,
    and the error id of why (the reason stays in the log)."""
    error_id = errors.incident(f"mode {mode!r} is broken", str(entry["reason"]), once=True)
    return {"retry_in_s": entry["retry_in_s"], "error_id": error_id}
