"""``[http]`` and its ``[http.models.NAME]`` tables: where the HTTP listener
listens, its tokens, and which OpenAI ``model`` runs in which mode and task.

Read here, not in the listener, so that a mistake stops ``gpuvisor serve``
before anything starts, with file, line and key, like every other key; and
so that the ``http`` extra is needed only to serve, not to read a file."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor.config_where import Locator, seconds, whole


@dataclass(frozen=True)
class HttpModel:
    """An OpenAI ``model`` name served over HTTP: the mode it runs in, and
    the task each endpoint submits (None: the endpoint does not serve it)."""

    name: str
    mode: str
    embeddings: str | None = None
    chat: str | None = None
    completions: str | None = None
    timeout: float | None = None  # a job's timeout; None: [supervisor] job_timeout


HTTP_UNIX_DEFAULT = "unix:http.sock"
MAX_BODY_CEILING = 64 * 1024 * 1024  # a job bigger than this could not travel to the worker anyway


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: present means served; ``listen = []`` turns it off."""

    listen: tuple[str, ...] = (HTTP_UNIX_DEFAULT,)  # "unix:PATH" (relative: the runtime directory) or "HOST:PORT"
    token_file: str = ""  # bearer tokens, one a line; absolute once parsed; "" none
    max_body_bytes: int = 16 * 1024 * 1024
    models: dict[str, HttpModel] = field(default_factory=dict)


def loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable from this machine alone."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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


_HTTP_KEYS = ("listen", "token_file", "max_body_bytes", "models")
_HTTP_MODEL_KEYS = ("mode", "embeddings", "chat", "completions", "timeout")
_MODEL_NAME_RE = re.compile(r"^[^\s\x00-\x1f]{1,128}$")


def parse_http(where: Locator, table: Any, modes: Collection[str], base: Path) -> HttpSettings:
    """``[http]`` and its ``[http.models.NAME]`` tables. A listener off
    loopback without tokens is refused here: a GPU open to the network by a
    typo must not start."""
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
    token_file = table.get("token_file", "")
    if not isinstance(token_file, str):
        raise where.error("http", "token_file", f"expected the path of a file of bearer tokens, got {token_file!r}")
    for entry in listen:
        try:
            address = split_listen(entry)
        except ValueError as exc:
            raise where.error("http", "listen", f"{entry!r}: {exc}") from None
        if isinstance(address, tuple) and not loopback_host(address[0]) and not token_file:
            raise where.error(
                "http", "listen", f"{entry!r} is not a loopback address: anyone who can reach it could run jobs on "
                "this GPU. Set token_file (a file of bearer tokens, one a line), or listen on loopback or a unix socket"
            )  # fmt: skip
    size = table.get("max_body_bytes", HttpSettings.max_body_bytes)
    if not whole(size) or not 1024 <= size <= MAX_BODY_CEILING:
        raise where.error(
            "http", "max_body_bytes", f"expected a whole number from 1024 to {MAX_BODY_CEILING}, got {size!r}"
        )
    models_table = table.get("models", {})
    if not isinstance(models_table, dict):
        raise where.error("http", "models", "must be a table of [http.models.NAME] tables")
    models = {name: _http_model(where, name, entry, modes) for name, entry in models_table.items()}
    if token_file:
        token_file = str((base / token_file).resolve())
    return HttpSettings(tuple(listen), token_file, size, models)


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
    return HttpModel(name, mode, **tasks, timeout=seconds(where, table, entry, "timeout", "0: none"))
