"""Who an HTTP caller is, for the share of the queue each client gets: the
token it presented when the door has tokens (as a fingerprint: the token
itself never leaves the door), else its connection; and, for the access
log, a label that names the caller without its secret.

A fingerprint is the first 16 hex digits of the token's SHA-256: stable
across restarts, so the log and the metrics of one token can be followed,
and of no use to guess the token (each is at least 16 characters).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.types import Scope

TOKEN_KEY = "gpuvisor.token"  # in the scope: the fingerprint of the token the door checked
ADMIN_KEY = "gpuvisor.admin"  # in the scope: True when that token is an admin token
CONNECTION_KEY = "gpuvisor.connection"  # in the scope: the connection's number on its listener
PEER_KEY = "gpuvisor.peer"  # in the scope, on a unix socket: the peer's (uid, gid) from SO_PEERCRED
VISIT_KEY = "gpuvisor.visit"  # in the scope: the request's Visit, which the admission fills in


@dataclass
class Visit:
    """One request, as the access log tells it; shared by every layer that
    sees the request (a layer may copy the scope, never this)."""

    caller: str = ""


def visit_of(scope: Scope) -> Visit | None:
    visit = scope.get(VISIT_KEY)
    return visit if isinstance(visit, Visit) else None


def address_of(scope: Scope) -> str:
    """The caller's connection, in words: ``HOST:PORT``, ``unix uid N``."""
    client = scope.get("client")
    if client:
        host, port = client[0], client[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    peer = scope.get(PEER_KEY)
    return f"unix uid {peer[0]}" if peer and peer[0] >= 0 else "unix"


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def client_of(scope: Scope) -> str:
    """``http:token:FINGERPRINT`` for a caller with a token;
    ``http:HOST:PORT`` (``http:[V6]:PORT``) for one on TCP without;
    ``http:unix:N`` on a unix socket, N the connection's number."""
    token = scope.get(TOKEN_KEY)
    if token:
        return f"http:token:{token}"
    if scope.get("client"):
        return f"http:{address_of(scope)}"
    return f"http:unix:{scope.get(CONNECTION_KEY, '?')}"
