"""Who an HTTP caller is, for the share of the queue each client gets: the
token it presented when the door has tokens (as a fingerprint: the token
itself never leaves the door), else its connection.

A fingerprint is the first 16 hex digits of the token's SHA-256: stable
across restarts, so the log and the metrics of one token can be followed,
and of no use to guess the token (each is at least 16 characters).
"""

from __future__ import annotations

import hashlib

from starlette.types import Scope

TOKEN_KEY = "gpuvisor.token"  # in the scope: the fingerprint of the token the door checked
CONNECTION_KEY = "gpuvisor.connection"  # in the scope: the connection's number on its listener


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def client_of(scope: Scope) -> str:
    """``http:token:FINGERPRINT`` for a caller with a token;
    ``http:HOST:PORT`` (``http:[V6]:PORT``) for one on TCP without;
    ``http:unix:N`` on a unix socket, N the connection's number."""
    token = scope.get(TOKEN_KEY)
    if token:
        return f"http:token:{token}"
    client = scope.get("client")
    if client:
        host, port = client[0], client[1]
        return f"http:[{host}]:{port}" if ":" in host else f"http:{host}:{port}"
    return f"http:unix:{scope.get(CONNECTION_KEY, '?')}"
