"""Who and what may come in through the HTTP door, decided before a route
runs: a bearer token when the configuration names a token file, a body no
larger than ``max_body_bytes``, and nothing new once the daemon drains.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one
runs the route in a task of its own, which hides a client's disconnect from
the route and would keep a cancelled caller's job alive.

Tokens: one a line in the file (blank lines and ``#`` comments ignored),
compared in constant time with every token there, so the time an answer
takes says nothing about how much of a guess was right. ``/health`` needs
none: a load balancer's probe seldom carries one, and it tells no secrets.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.config_http import HttpModel
from supervisor.service.front import EndpointError
from supervisor.service.http.errors import body
from supervisor.service.secret_files import check_secret_file

log = logging.getLogger("gpuvisor")

OPEN_PATHS = ("/health",)  # served without a token
ALWAYS_PATHS = ("/health", "/metrics")  # served while draining too


def read_tokens(path: str) -> tuple[str, ...]:
    """The bearer tokens in ``path``; a file that cannot be read, or holds
    none, stops the daemon from starting (a door with no key would lock
    everyone out, or be mistaken for one with no lock), and so does one that
    someone else could add a token to (``check_secret_file``)."""
    check_secret_file(path, "[http] token_file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointError(f"[http] token_file {path}: cannot read: {exc}") from None
    tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
    if not tokens:
        raise EndpointError(f"[http] token_file {path} holds no token (one a line)")
    if any(len(t) < 16 or any(c.isspace() for c in t) for t in tokens):
        raise EndpointError(f"[http] token_file {path}: a token must be at least 16 characters, without spaces")
    return tokens


@dataclass
class Door:
    """What the HTTP side reads on every request, set by the daemon's thread
    (each a single assignment, so no lock is needed)."""

    models: dict[str, HttpModel]
    tokens: tuple[str, ...] = ()
    max_body_bytes: int = 16 * 1024 * 1024
    draining: bool = False
    started: float = field(default=0.0)

    def token_ok(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return False
        given_bytes = given.strip().encode()
        matches = [hmac.compare_digest(given_bytes, t.encode()) for t in self.tokens]  # every one, always
        return any(matches)


class Admission:
    def __init__(self, app: ASGIApp, door: Door):
        self.app, self.door = app, door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, door = scope.get("path", ""), self.door
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if door.tokens and path not in OPEN_PATHS and not door.token_ok(headers.get("authorization")):
            await _answer(send, 401, "a valid bearer token is required (Authorization: Bearer TOKEN)",
                          "invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        if door.draining and path not in ALWAYS_PATHS:
            await _answer(send, 503, "the daemon is draining: it takes no new requests", "shutting_down")
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length", "")
            too_large = declared.isdigit() and int(declared) > door.max_body_bytes
            body_message = None if too_large else await _read_body(receive, door.max_body_bytes)
            if body_message is None:
                await _answer(send, 413, f"the request body is over max_body_bytes ({door.max_body_bytes})",
                              "request_too_large")  # fmt: skip
                return
            receive = _replay(body_message, receive)
            # Every body here is JSON, whatever the header says (curl -d sends a form's type).
            scope = {**scope, "headers": [*_without(scope, b"content-type"), (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def _without(scope: Scope, name: bytes) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in scope.get("headers", []) if k.lower() != name]


async def _read_body(receive: Receive, limit: int) -> Message | None:
    """The whole body as one message, or None past ``limit`` (it is read
    here, not by the route, so the 413 goes out before anything else could
    answer, and memory stays bounded)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message  # the client left: the route sees it at once
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` with ``first`` handed out before what the server says next
    (a disconnect, which the routes listen for)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


async def _answer(send: Send, status: int, message: str, code: str,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    content = json.dumps(body(status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": content})
