"""The two layers around everything the door serves: the access log, one
line per request, and the last resort, which turns an exception no route
answered into an OpenAI-shaped 500, so no caller ever reads uvicorn's
plain-text "Internal Server Error" and the log holds one report, not two.

::

    AccessLog ─▶ LastResort ─▶ Admission ─▶ the routes (FastAPI)

The access line: ``HTTP GET /v1/models 200 0.002s token 2``: method, path
(as sent, percent escapes kept, so no caller can write a line break into
the log), status (``-`` when none was sent: the client left first),
seconds to the answer's last byte, and the caller: the place of its token
in its file (``token N``, ``admin N``), else its address (``HOST:PORT``,
``unix uid N``); never the token. It goes through the daemon's log, past
the filter that holds back repeated lines: an access log that drops lines
is no record.
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.service.http.admission import Door, answer
from supervisor.service.http.clients import VISIT_KEY, Visit, address_of
from supervisor.service.http.errors import LOGGED

log = logging.getLogger("gpuvisor")
_SHOWN = 200  # the most characters of a path or method the access line repeats


class AccessLog:
    def __init__(self, app: ASGIApp, door: Door):
        self.app, self.door = app, door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        visit = scope[VISIT_KEY] = Visit(address_of(scope))
        began = time.perf_counter()
        status = "-"

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if self.door.settings.access_log:
                path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "backslashreplace")
                shown = path.decode("ascii", "backslashreplace")[:_SHOWN]
                method = str(scope.get("method", ""))[:_SHOWN]
                took = time.perf_counter() - began
                # An open status page polls once a second: a line each would bury the rest.
                level = logging.DEBUG if (method, shown, status) == ("GET", "/v1/glance", "200") else logging.INFO
                log.log(
                    level,
                    "HTTP %s %s %s %.3fs %s",
                    method,
                    shown,
                    status,
                    took,
                    visit.caller,
                    extra={"every_one": True},
                )


class LastResort:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - the last place an exception can become an answer
            if getattr(exc, LOGGED, False) and started:
                return  # answered and logged by the routes' handler; uvicorn must not log it again
            error_id = secrets.token_hex(6)
            log.error("HTTP error %s: %s %s raised", error_id, scope.get("method"), scope.get("path"), exc_info=exc)
            if not started:
                await answer(
                    send, 500, f"the server could not answer this request (error id {error_id})", "internal_error"
                )
