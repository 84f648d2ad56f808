"""The daemon's HTTP front door: OpenAI's API (embeddings, chat,
completions, models), a health probe and Prometheus metrics, served by
``gpuvisor serve`` when the configuration has an ``[http]`` table.

It is an optional extra (``pip install 'gpuvisor[http]'``: FastAPI and
uvicorn), so nothing here imports them until the listener is opened: a
daemon without ``[http]`` runs without them.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from supervisor.client.endpoint import ipc_path, runtime_dir
from supervisor.config import Config
from supervisor.service.front import EndpointError
from supervisor.service.operators import Operators

if TYPE_CHECKING:
    from supervisor.service.http.server import HttpFront

log = logging.getLogger("gpuvisor")


class HttpUnavailable(EndpointError):
    """``[http]`` is configured, but FastAPI or uvicorn is not installed."""

    code = "http_unavailable"


def open_http(config: Config, endpoint: str) -> HttpFront | None:
    """The HTTP listener the configuration asks for, its sockets bound, or
    None. A relative unix socket path is put beside the daemon's own socket
    (``endpoint``'s folder; the runtime directory for a TCP endpoint), so
    two daemons on two sockets never reach for one HTTP socket. The built-in
    configuration asks for a listener too, but is not refused without the
    extra: it only says so, since nobody chose it."""
    settings = config.http
    if settings is None or not settings.listen:
        return None
    try:
        from supervisor.service.http.server import HttpFront
    except ImportError as exc:
        if config.source.startswith("<built-in"):
            why = "no HTTP listener: the built-in configuration has one, but %s (pip install 'gpuvisor[http]')"
            log.warning(why, exc)
            return None
        raise HttpUnavailable(
            f"{config.source} has [http], but the HTTP extra is not installed ({exc}): pip install 'gpuvisor[http]'"
        ) from None
    path = ipc_path(endpoint)
    folder = os.path.dirname(path) if path and path.startswith("/") else runtime_dir()
    operators = Operators(config.daemon.admin_group)
    return HttpFront(settings, folder, group=config.daemon.socket_group, operators=operators)
