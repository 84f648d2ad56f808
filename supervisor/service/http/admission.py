"""Who and what may come in through the HTTP door, decided before a route
runs: no browser the operator did not allow, a bearer token when the
configuration names a token file, a JSON body no larger than
``max_body_bytes`` and sent within ``body_timeout``, and nothing new once the
daemon drains.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one
runs the route in a task of its own, which hides a client's disconnect from
the route and would keep a cancelled caller's job alive.

Tokens: one a line in the file (blank lines and ``#`` comments ignored),
compared in constant time with every token there, so the time an answer
takes says nothing about how much of a guess was right. ``/health`` needs
none: a load balancer's probe seldom carries one, and it tells no secrets.
The status page's browser shows its token as a cookie (``/ui?token=``
sets it); the browser rules below keep other sites from using it.
A token of ``admin_token_file`` is a token like the others, and marks its
caller an operator for the admin routes (``admin.py`` decides those).

Browsers: a web page the user visits can send requests to any address,
loopback included, so what a browser sends on a page's behalf is refused
unless the operator allowed the page's origin (``allowed_origins``, which
also answers the CORS preflight): a cross-site ``Origin`` or ``Sec-Fetch-Site:
cross-site`` is a 403, and every POST must say ``Content-Type:
application/json``, which no page can send without asking first. On TCP
without tokens only loopback ``Host`` names are served, so a name an
attacker points at 127.0.0.1 (DNS rebinding) reaches nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import urllib.parse
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from supervisor.config_http import HttpModel, HttpSettings
from supervisor.service.front import EndpointError
from supervisor.service.http.clients import ADMIN_KEY, TOKEN_KEY, fingerprint, visit_of
from supervisor.service.http.errors import body
from supervisor.service.secret_files import check_secret_file

log = logging.getLogger("gpuvisor")

OPEN_PATHS = ("/health",)  # served without a token
ALWAYS_PATHS = ("/health", "/metrics")  # served while draining too
PAGE = "/ui"  # the status page: the one place a token may come in the address, once
COOKIE = "gpuvisor_token"  # where the page's browser keeps it after that


def read_tokens(path: str, key: str = "token_file") -> tuple[str, ...]:
    """The bearer tokens in ``path`` (``[http] key``); a file that cannot be
    read, or holds none, stops the daemon from starting (a door with no key
    would lock everyone out, or be mistaken for one with no lock), and so
    does one that someone else could add a token to (``check_secret_file``)."""
    check_secret_file(path, f"[http] {key}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise EndpointError(f"[http] {key} {path}: cannot read: {exc}") from None
    tokens = tuple(t for t in (line.strip() for line in lines) if t and not t.startswith("#"))
    if not tokens:
        raise EndpointError(f"[http] {key} {path} holds no token (one a line)")
    if any(len(t) < 16 or any(c.isspace() for c in t) for t in tokens):
        raise EndpointError(f"[http] {key} {path}: a token must be at least 16 characters, without spaces")
    return tokens


def read_all_tokens(settings: HttpSettings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``token_file``'s tokens and ``admin_token_file``'s, each () when not set."""
    plain = read_tokens(settings.token_file) if settings.token_file else ()
    admin = read_tokens(settings.admin_token_file, "admin_token_file") if settings.admin_token_file else ()
    return plain, admin


@dataclass(frozen=True)
class Badge:
    """A caller's token, as the door knows it: never the token itself."""

    fingerprint: str
    label: str  # for the access log: "token 2", "admin 1" (its place in its file, counting tokens only)
    admin: bool


@dataclass
class Door:
    """What the HTTP side reads on every request, set by the daemon's thread
    (each a single assignment, so no lock is needed): the settings as a
    whole, so a reload swaps every limit at once."""

    settings: HttpSettings
    tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()  # admin_token_file's: tokens too, and operators' on the admin routes
    draining: bool = False
    started: float = field(default=0.0)
    widths: dict[tuple[str, str], int] = field(default_factory=dict)  # (mode, task) -> its vectors' width

    @property
    def models(self) -> dict[str, HttpModel]:
        return self.settings.models

    @property
    def guarded(self) -> bool:
        """Whether every request but ``OPEN_PATHS`` must show a token."""
        return bool(self.tokens or self.admin_tokens)

    def badge_of(self, header: str | None) -> Badge | None:
        """Who the token ``header`` carries (``Bearer TOKEN``) is, or None
        for no configured token."""
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        given_bytes = given.strip().encode()
        tokens = (*self.admin_tokens, *self.tokens)  # an admin token in both files is an admin's
        matches = [hmac.compare_digest(given_bytes, t.encode()) for t in tokens]  # every one, always
        if not any(matches):
            return None
        index = matches.index(True)
        admin = index < len(self.admin_tokens)
        place = index + 1 if admin else index - len(self.admin_tokens) + 1
        return Badge(fingerprint(tokens[index]), f"{'admin' if admin else 'token'} {place}", admin)


def loopback_name(host: str) -> bool:
    """Whether a ``Host`` header names this machine's loopback: ``localhost``
    or a loopback address, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Admission:
    def __init__(self, app: ASGIApp, door: Door):
        self.app, self.door = app, door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, door, limits = scope.get("path", ""), self.door, self.door.settings
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refused = self._stranger(scope, headers)
        if refused is not None:
            await answer(send, 403, refused, "forbidden")
            return
        origin = headers.get("origin")
        if origin is not None and _listed(origin, limits.allowed_origins):
            send = _with_cors(send, origin)
            if scope.get("method") == "OPTIONS" and "access-control-request-method" in headers:
                await send({"type": "http.response.start", "status": 204, "headers": _PREFLIGHT})
                await send({"type": "http.response.body", "body": b""})
                return
        if door.guarded and path not in OPEN_PATHS:
            if path == PAGE and scope.get("method") == "GET" and b"token=" in scope.get("query_string", b""):
                await self._let_page_in(scope, send)
                return
            badge = door.badge_of(headers.get("authorization") or _cookie_bearer(headers.get("cookie")))
            if badge is None:
                message = "a valid bearer token is required (Authorization: Bearer TOKEN)"
                await answer(send, 401, message, "invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])
                return
            scope = {**scope, TOKEN_KEY: badge.fingerprint, ADMIN_KEY: badge.admin}
            visit = visit_of(scope)
            if visit is not None:
                visit.caller = badge.label
        if door.draining and path not in ALWAYS_PATHS:
            await answer(send, 503, "the daemon is draining: it takes no new requests", "shutting_down")
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            media = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media != "application/json":
                message = "the body must be JSON, sent with Content-Type: application/json (curl --json)"
                await answer(send, 415, message, "unsupported_media_type")
                return
            declared = headers.get("content-length", "")
            too_large = declared.isdigit() and int(declared) > limits.max_body_bytes
            try:
                async with asyncio.timeout(limits.body_timeout):
                    body_message = None if too_large else await _read_body(receive, limits.max_body_bytes)
            except TimeoutError:
                message = f"the body did not arrive within body_timeout ({limits.body_timeout:g} s)"
                await answer(send, 408, message, "request_timeout", extra=[(b"connection", b"close")])
                return
            if body_message is None:
                message = f"the request body is over max_body_bytes ({limits.max_body_bytes})"
                await answer(send, 413, message, "request_too_large")
                return
            receive = _replay(body_message, receive)
            del body_message  # held by the replay until the route takes it, then by nobody here
        await self.app(scope, receive, send)

    async def _let_page_in(self, scope: Scope, send: Send) -> None:
        """``/ui?token=TOKEN``: a person opening a link cannot send a bearer
        header, so a good token becomes a cookie (HttpOnly: no script reads
        it; SameSite=Strict: no other site's page sends it) and the browser
        goes on to ``/ui``, which leaves the token out of its address bar
        and history. A bad one is a 401 like any other."""
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = (query.get("token") or [""])[0]
        if self.door.badge_of(f"Bearer {given}") is None:
            message = "the token in the address is not valid: open /ui?token=TOKEN with a token of [http] token_file"
            await answer(send, 401, message, "invalid_api_key")
            return
        cookie = f"{COOKIE}={urllib.parse.quote(given, safe='')}; Path=/; HttpOnly; SameSite=Strict"
        headers = [(b"location", PAGE.encode()), (b"set-cookie", cookie.encode("latin-1")), (b"content-length", b"0")]
        await send(
            {"type": "http.response.start", "status": 303, "headers": [*headers, (b"cache-control", b"no-store")]}
        )
        await send({"type": "http.response.body", "body": b""})

    def _stranger(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """Why a browser (or a name that is not ours) may not come in, or None."""
        server = scope.get("server")
        host = headers.get("host")
        if not self.door.guarded and server is not None and server[1] is not None and host is not None:
            if not loopback_name(host):  # TCP without tokens: only this machine's names (no DNS rebinding)
                return (
                    f"Host {host[:100]!r} is not served here: without tokens this listener answers to "
                    "localhost, 127.0.0.1 and [::1] only"
                )
        origin = headers.get("origin")
        if origin is not None:
            own = host is not None and origin.lower() == f"http://{host.lower()}"
            if not own and not _listed(origin, self.door.settings.allowed_origins):
                return (
                    f"requests from web pages of another origin ({origin[:100]!r}) are refused; "
                    "[http] allowed_origins lets one in"
                )
        elif headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "requests from web pages of another site are refused; [http] allowed_origins lets one in"
        return None


def _cookie_bearer(header: str | None) -> str | None:
    """The status page's cookie, as the bearer header it stands for (None: no such cookie)."""
    if not header or COOKIE not in header:
        return None
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return f"Bearer {urllib.parse.unquote(value)}"
    return None


def _listed(origin: str, allowed: tuple[str, ...]) -> bool:
    return "*" in allowed or origin.lower() in allowed


_PREFLIGHT = [
    (b"access-control-allow-methods", b"GET, POST"),
    (b"access-control-allow-headers", b"authorization, content-type"),
    (b"access-control-max-age", b"600"),
    (b"content-length", b"0"),
]


def _with_cors(send: Send, origin: str) -> Send:
    """``send``, its answer readable by the page at ``origin`` (one the operator allowed)."""
    extra = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    async def cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return cors


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


async def answer(
    send: Send, status: int, message: str, code: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    content = json.dumps(body(status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": content})
