"""``[http]`` and its ``[http.models.NAME]`` tables: where the HTTP listener
listens, its tokens, the limits every request is held to, and which OpenAI
``model`` runs in which mode and task.

Read here, not in the listener, so that a mistake stops ``gpuvisor serve``
before anything starts, with file, line and key, like every other key; and
so that the ``http`` extra is needed only to serve, not to read a file."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config_where import Locator, number, seconds, whole


@dataclass(frozen=True)
class HttpModel:
    """An OpenAI ``model`` name served over HTTP: the mode it runs in, and
    the task each endpoint submits (None: the endpoint does not serve it)."""

    name: str
    mode: str
    embeddings: str | None = None
    chat: str | None = None
    completions: str | None = None
    timeout: float | None = None  # a job's timeout (0: none); None: [http] timeout
    max_tokens: int | None = None  # the most tokens a request may ask for; None: [http] max_tokens


HTTP_UNIX_DEFAULT = "unix:http.sock"
MAX_BODY_CEILING = 64 * 1024 * 1024  # a job bigger than this could not travel to the worker anyway


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: present means served; ``listen = []`` turns it off. Every
    limit has a default a single user never meets and a stranger cannot
    abuse; docs/http.md ("Limits") says why each is what it is."""

    listen: tuple[str, ...] = (HTTP_UNIX_DEFAULT,)  # "unix:PATH" (relative: the runtime directory) or "HOST:PORT"
    token_file: str = ""  # bearer tokens, one a line; absolute once parsed; "" none
    admin_token_file: str = ""  # tokens that may also call the admin routes; the same rules; "" none
    access_log: bool = True  # a line per request in the daemon's log
    max_body_bytes: int = 16 * 1024 * 1024
    models: dict[str, HttpModel] = field(default_factory=dict)
    allow_unauthenticated_tcp: bool = False  # loopback TCP without tokens: every local user gets in
    allowed_origins: tuple[str, ...] = ()  # browser origins let in besides the listener's own ("*": any)
    # The connection: how many at once, how big and how slow a request's head and body may be, how slowly
    # its answers may be read.
    max_connections: int = 512
    max_connections_per_user: int = 0  # on a unix socket, by the peer's uid; 0: a quarter of max_connections
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    body_timeout: float = 60.0
    send_timeout: float = 60.0  # an answer's bytes waiting for a client that reads none of them
    # The request: what one may ask for.
    max_inputs: int = 2048
    max_messages: int = 2048
    max_input_chars: int = 1_000_000
    max_stop: int = 4
    max_stop_chars: int = 256
    max_tokens: int = 4096
    timeout: float = 300.0  # a job's seconds of running time (0: none), unless its model says otherwise

    def per_user(self) -> int:
        """The most connections one user (a unix socket peer's uid) may hold."""
        return self.max_connections_per_user or max(1, self.max_connections // 4)

    def tcp_connections(self) -> int:
        """The most connections TCP may hold: an eighth of ``max_connections``
        is kept for the unix socket when there is one, so a flood on TCP,
        where nobody is known before the head, cannot shut it out."""
        unix = any(entry.startswith("unix:") for entry in self.listen)
        return self.max_connections - (self.max_connections // 8 if unix else 0)

    def max_tokens_of(self, model: HttpModel) -> int:
        return self.max_tokens if model.max_tokens is None else model.max_tokens

    def timeout_of(self, model: HttpModel) -> float:
        return self.timeout if model.timeout is None else model.timeout


def loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable from this machine alone."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_page_listener(settings: HttpSettings | None, entry: str) -> HttpSettings:
    """``[http]`` with the listener ``gpuvisor serve --ui HOST:PORT`` adds:
    a browser cannot reach a unix socket, so ``make run`` opens the status
    page on loopback TCP. Loopback only; without tokens it is accepted as
    ``allow_unauthenticated_tcp`` is, since the command line asked for it.
    ValueError says what is wrong with ``entry``."""
    address = split_listen(entry)
    if not isinstance(address, tuple) or not loopback_host(address[0]):
        raise ValueError(f"--ui takes a loopback HOST:PORT such as 127.0.0.1:8421, got {entry!r}")
    base = settings if settings is not None else HttpSettings(listen=())
    if entry in base.listen:
        return base
    return dataclasses.replace(base, listen=(*base.listen, entry), allow_unauthenticated_tcp=True)


def split_listen(entry: str) -> tuple[str, int] | str:
    """``unix:PATH`` -> PATH; ``HOST:PORT`` / ``[V6]:PORT`` -> (host, port).
    ValueError says what is wrong."""
    if entry.startswith("unix:"):
        path = entry[len("unix:") :]
        if not path or path.startswith("@"):
            raise ValueError("a unix socket needs a file path (unix:/run/gpuvisor/http.sock, or unix:NAME)")
        return path
    host, colon, port = entry.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected 'unix:PATH' or 'HOST:PORT' with a port from 1 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"HOST must be an IP address or localhost, got {host!r}") from None
    return host, int(port)


# key -> (lowest, highest, what it counts); each a whole number unless its range has a float in it.
_LIMITS: dict[str, tuple[float, float, str]] = {
    "max_body_bytes": (1024, MAX_BODY_CEILING, "bytes"),
    "max_connections": (1, 65536, "connections"),
    "max_connections_per_user": (0, 65536, "connections (0: a quarter of max_connections)"),
    "max_header_bytes": (1024, 1024 * 1024, "bytes"),
    "header_timeout": (0.1, 3600.0, "seconds"),
    "keep_alive_timeout": (0.1, 3600.0, "seconds"),
    "body_timeout": (0.1, 3600.0, "seconds"),
    "send_timeout": (0.1, 3600.0, "seconds"),
    "max_inputs": (1, 1_000_000, "inputs"),
    "max_messages": (1, 1_000_000, "messages"),
    "max_input_chars": (1, MAX_BODY_CEILING, "characters"),
    "max_stop": (0, 64, "stop strings"),
    "max_stop_chars": (1, 65536, "characters"),
    "max_tokens": (1, 10_000_000, "tokens"),
    "timeout": (0.0, 86400.0, "seconds (0: none)"),
}
_HTTP_KEYS = (
    "listen",
    "token_file",
    "admin_token_file",
    "access_log",
    "allow_unauthenticated_tcp",
    "allowed_origins",
    *_LIMITS,
    "models",
)
_HTTP_MODEL_KEYS = ("mode", "embeddings", "chat", "completions", "timeout", "max_tokens")
_MODEL_NAME_RE = re.compile(r"^[^\s\x00-\x1f]{1,128}$")
_ORIGIN_RE = re.compile(r"^https?://(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(:[0-9]{1,5})?$")


def _limit(where: Locator, table: str, entry: dict, key: str, default: float) -> Any:
    low, high, unit = _LIMITS[key]
    value = entry.get(key, default)
    fits = whole(value) if isinstance(low, int) else number(value)
    if not fits or not low <= value <= high:
        kind = "a whole number" if isinstance(low, int) else "a number"
        raise where.error(table, key, f"expected {kind} of {unit} from {low} to {high}, got {value!r}")
    return value if isinstance(low, int) else float(value)


def _origins(where: Locator, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise where.error("http", "allowed_origins", f'expected a list like ["https://ui.example"], got {value!r}')
    for origin in value:
        if origin != "*" and not _ORIGIN_RE.match(origin.lower()):
            message = (
                f"{origin!r}: expected SCHEME://HOST[:PORT] as a browser sends it (no path, no trailing slash), "
                'or "*" for any'
            )
            raise where.error("http", "allowed_origins", message)
    return tuple(o.lower() for o in value)


def parse_http(where: Locator, table: Any, modes: Collection[str], base: Path) -> HttpSettings:
    """``[http]`` and its ``[http.models.NAME]`` tables. A listener off
    loopback without tokens is refused here: a GPU open to the network by a
    typo must not start; loopback TCP without tokens needs
    ``allow_unauthenticated_tcp``, as the daemon's own TCP endpoint does."""
    if not isinstance(table, dict):
        raise where.error("http", None, "must be a table")
    for key in table:
        if key not in _HTTP_KEYS:
            raise where.error("http", key, f"unknown key; known keys are {', '.join(_HTTP_KEYS)}")
    listen = table.get("listen", list(HttpSettings.listen))
    if not isinstance(listen, list) or not all(isinstance(e, str) for e in listen):
        raise where.error(
            "http", "listen", f'expected a list like ["unix:http.sock", "127.0.0.1:8080"], got {listen!r}'
        )
    token_file, admin_token_file = (_path(where, table, key) for key in ("token_file", "admin_token_file"))
    unauthenticated, access_log = (
        _flag(where, table, key, default)
        for key, default in (("allow_unauthenticated_tcp", False), ("access_log", True))
    )
    tokens = token_file or admin_token_file  # either file makes every request show a token
    for entry in listen:
        try:
            address = split_listen(entry)
        except ValueError as exc:
            raise where.error("http", "listen", f"{entry!r}: {exc}") from None
        if isinstance(address, tuple) and not loopback_host(address[0]) and not tokens:
            message = (
                f"{entry!r} is not a loopback address: anyone who can reach it could run jobs on this GPU. "
                "Set token_file (a file of bearer tokens, one a line), or listen on loopback or a unix socket"
            )
            raise where.error("http", "listen", message)
        if isinstance(address, tuple) and not tokens and not unauthenticated:
            message = (
                f"{entry!r} has no authentication: every local user could run jobs on this GPU "
                "(a unix socket's file permissions do not apply to TCP). Listen on a unix socket, set token_file, "
                "or accept it with [http] allow_unauthenticated_tcp = true"
            )
            raise where.error("http", "listen", message)
    origins = _origins(where, table.get("allowed_origins", []))
    limits = {key: _limit(where, "http", table, key, getattr(HttpSettings, key)) for key in _LIMITS}
    models_table = table.get("models", {})
    if not isinstance(models_table, dict):
        raise where.error("http", "models", "must be a table of [http.models.NAME] tables")
    models = {name: _http_model(where, name, entry, modes) for name, entry in models_table.items()}
    # Absolute, their links kept: check_secret_file judges each link on the
    # way, at start and at every reload (resolved here, someone else's link
    # was followed and its target trusted).
    token_file, admin_token_file = (str(base / path) if path else "" for path in (token_file, admin_token_file))
    return HttpSettings(
        tuple(listen),
        token_file,
        admin_token_file,
        access_log,
        models=models,
        allow_unauthenticated_tcp=unauthenticated,
        allowed_origins=origins,
        **limits,
    )


def _path(where: Locator, table: dict, key: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise where.error("http", key, f"expected the path of a file of bearer tokens, got {value!r}")
    return value


def _flag(where: Locator, table: dict, key: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise where.error("http", key, f"expected true or false, got {value!r}")
    return value


def _http_model(where: Locator, name: str, entry: Any, modes: Collection[str]) -> HttpModel:
    table = f"http.models.{name}"
    if not _MODEL_NAME_RE.match(name):
        raise where.error(table, None, "a model name is 1-128 characters, no spaces or control characters")
    if not isinstance(entry, dict):
        raise where.error("http.models", name, 'must be a table: { mode = "MODE", embeddings = "TASK" ... }')
    for key in entry:
        if key not in _HTTP_MODEL_KEYS:
            raise where.error(table, key, f"unknown key; a model has 'mode' and {', '.join(_HTTP_MODEL_KEYS[1:])}")
    mode = entry.get("mode")
    if not isinstance(mode, str) or mode not in modes:
        raise where.error(table, "mode", f"expected one of the modes {sorted(modes)}, got {mode!r}")
    tasks = {key: entry.get(key) for key in ("embeddings", "chat", "completions")}
    for key, task in tasks.items():
        if task is not None and (not isinstance(task, str) or not task):
            raise where.error(table, key, f"expected the name of the task that serves /v1/{key}, got {task!r}")
    if not any(tasks.values()):
        raise where.error(table, None, "names no task: give at least one of embeddings, chat or completions")
    max_tokens = _limit(where, table, entry, "max_tokens", 0) if "max_tokens" in entry else None
    timeout = seconds(where, table, entry, "timeout", "0: none")
    return HttpModel(name, mode, **tasks, timeout=timeout, max_tokens=max_tokens)
