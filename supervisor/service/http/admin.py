"""The operator's routes: ``/v1/admin/status``, ``switch``, ``restart``,
``unload`` and ``reload``. They change the service for every caller, so
they are the operators' alone, told apart as the ZeroMQ door tells them:

* a request with a token of ``[http] admin_token_file``, on any address;
* on a unix socket, a peer the kernel names (``SO_PEERCRED``, which it
  cannot forge) as the daemon's own user, root, or a member of ``[daemon]
  admin_group``: they could stop the daemon anyway.

Anyone else, a caller with a plain token included, gets a 403 (a 401 where
the door wants a token and none came, from the admission). On TCP without
tokens nobody is known, so nobody is an operator there.

A switch or restart waits its turn in the queue like a job and is not
given up when its caller leaves: an operator's order stands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from supervisor.api import Supervisor
from supervisor.service.http import jobs, results
from supervisor.service.http.admission import Door
from supervisor.service.http.clients import ADMIN_KEY, PEER_KEY, address_of, visit_of
from supervisor.service.http.errors import ApiError, from_named
from supervisor.service.http.openai import parse
from supervisor.service.operators import Operators

log = logging.getLogger("gpuvisor")

Reload = Callable[[], dict[str, Any]]
"""The daemon's reload: reads the configuration again and reports what changed."""

_NAME = Field(default=None, min_length=1, max_length=256)


class _Order(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class SwitchOrder(_Order):
    mode: str = Field(min_length=1, max_length=256)
    device: str | None = _NAME


class RestartOrder(_Order):
    mode: str | None = _NAME
    device: str | None = _NAME


class UnloadOrder(_Order):
    device: str | None = _NAME


class ReloadOrder(_Order):
    pass


def is_operator(request: Request, operators: Operators) -> bool:
    if request.scope.get(ADMIN_KEY):
        return True
    peer = request.scope.get(PEER_KEY)
    return peer is not None and peer[0] >= 0 and operators.allows(*peer)


def add_routes(app: FastAPI, sup: Supervisor, door: Door, operators: Operators, reload: Reload | None) -> None:
    async def order(request: Request, kind: type[BaseModel]) -> Any:
        """The request's order, once its caller is known to be an operator."""
        if not is_operator(request, operators):
            message = (
                "the admin routes are for operators: send a token of [http] admin_token_file, or call on the "
                "unix socket as the daemon's own user, root or a member of [daemon] admin_group"
            )
            raise ApiError(403, message, "forbidden")
        if request.method == "GET":
            return None
        raw = await jobs.read_body(request)
        return parse(kind, raw if raw.strip() else b"{}", door.settings)  # no body: an order without arguments

    def said(request: Request, what: str) -> None:
        visit = visit_of(request.scope)
        route = request.url.path.rsplit("/", 1)[-1]
        caller = visit.caller if visit and visit.caller else address_of(request.scope)
        log.info("HTTP admin %s (%s): %s", route, caller, what)

    @app.get("/v1/admin/status")
    async def status(request: Request) -> Response:
        await order(request, ReloadOrder)
        return _json(sup.status())

    @app.post("/v1/admin/switch")
    async def switch(request: Request) -> Response:
        body: SwitchOrder = await order(request, SwitchOrder)
        said(request, f"to {body.mode}" + (f" on {body.device}" if body.device else ""))
        return _json(await _outcome(lambda: sup.switch_mode(body.mode, device=body.device)))

    @app.post("/v1/admin/restart")
    async def restart(request: Request) -> Response:
        body: RestartOrder = await order(request, RestartOrder)
        said(request, f"{body.mode or 'the mode in force'}" + (f" on {body.device}" if body.device else ""))
        return _json(await _outcome(lambda: sup.restart(body.mode, device=body.device)))

    @app.post("/v1/admin/unload")
    async def unload(request: Request) -> Response:
        body: UnloadOrder = await order(request, UnloadOrder)
        said(request, body.device or "every device")
        return _json(await _outcome(lambda: sup.unload(device=body.device)))

    @app.post("/v1/admin/reload")
    async def reload_config(request: Request) -> Response:
        await order(request, ReloadOrder)
        if reload is None:
            raise ApiError(501, "reload is served only by the daemon", "not_implemented")
        said(request, "the configuration")
        return _json(await run_in_threadpool(reload))


async def _outcome(start: Callable[[], Future]) -> Any:
    """The order's result, or its error as the answer it maps to; the order
    goes on if the request is cancelled (its caller left, the server stops)."""
    try:
        return await asyncio.shield(asyncio.wrap_future(start()))
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - each error has its answer (bad arguments: a 400)
        raise from_named(exc, operator=True) from exc


def _json(value: Any) -> Response:
    return Response(results.as_json(value), media_type=results.JSON)
