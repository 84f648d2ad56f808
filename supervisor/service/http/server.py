"""The HTTP listener: its sockets, and uvicorn on a thread of its own.

::

    main thread (daemon)            HTTP thread (its own asyncio loop)
    ────────────────────            ──────────────────────────────────
    bind the sockets (exit 6 on a   uvicorn.Server.serve(sockets): routes
      bad address, before the         call the Supervisor (thread-safe) and
      worker starts)                  await its Futures
    serve(sup) ─ start ───────────▶ (no signal handlers: off the main
    drain() ─ door.draining ──────▶   thread, uvicorn installs none; the
                                      daemon's main thread owns the signals)
    stop(grace) ─ should_exit ────▶ close the listeners, let answers in
                                      progress finish (at most ``grace``)

The sockets are made here rather than by uvicorn: uvicorn would make a
unix socket world-writable (0666), and the daemon's rule for a socket file
(``supervisor.service.front``) is 0600, or 0660 for its group, in a private
directory, never over a live daemon's socket. A TCP socket is made with
``IPPROTO_TCP`` named, so asyncio sets ``TCP_NODELAY`` on each connection it
accepts (it looks at the listener's protocol number, which is 0 unless
named): a small answer is not held back waiting for the client's ACK.

uvicorn runs each connection with ``DoorProtocol`` (its h11 protocol, held to
the door's connection limits: ``connection.py``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import socket
import threading
import time

import uvicorn

from supervisor.api import Supervisor
from supervisor.config_http import HttpSettings, loopback_host, split_listen
from supervisor.service.front import EndpointError, bind_unix, release_path
from supervisor.service.glance import Glance
from supervisor.service.http.admin import Reload
from supervisor.service.http.admission import Admission, Door, read_all_tokens
from supervisor.service.http.app import create_app
from supervisor.service.http.connection import QUIET, DoorProtocol
from supervisor.service.http.outer import AccessLog, LastResort
from supervisor.service.operators import Operators

log = logging.getLogger("gpuvisor")

_START_S = 30.0  # the listener must be up within this long (it only imports and opens sockets)
_BACKLOG = 2048
_OWN_FILES = 256  # descriptors the daemon needs besides its HTTP connections (sockets, pipes, logs, libraries)


class HttpFront:
    def __init__(self, settings: HttpSettings, folder: str, group: str = "", operators: Operators | None = None):
        """Bind every address in ``settings.listen`` now (on the daemon's
        main thread, before the worker starts): an address in use or unsafe
        stops the daemon here, with the reason. A relative unix socket path
        starts from ``folder``: where the daemon's own socket is.
        ``operators``: who may call the admin routes on a unix socket."""
        tokens, admin_tokens = read_all_tokens(settings)
        self.door = Door(settings, tokens=tokens, admin_tokens=admin_tokens)
        self.operators = operators or Operators()
        self.settings = settings
        self.listening: list[str] = []
        self._sockets: list[socket.socket] = []
        self._files: list[tuple[str, tuple[int, int]]] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        try:
            for entry in settings.listen:
                self._bind(entry, folder, group)
        except BaseException:
            self.close()
            raise

    def _bind(self, entry: str, folder: str, group: str) -> None:
        address = split_listen(entry)
        if isinstance(address, str):
            path = os.path.join(folder, address)  # an absolute address stays as it is
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sockets.append(sock)
            self._files.append((path, bind_unix(path, lambda: sock.bind(path), group=group)))
            shown = f"unix:{path}"
        else:
            host, port = address
            host = "127.0.0.1" if host == "localhost" else host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
            self._sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            shown = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
            if loopback_host(host) and not self.door.guarded:
                risk = "every local user can run jobs on this GPU"
                log.warning("HTTP on %s without tokens (allow_unauthenticated_tcp = true): %s", shown, risk)
        sock.listen(_BACKLOG)  # at once: a second daemon probing a unix socket must find it alive
        self.listening.append(shown)

    # ------------------------------------------------------------ running

    def serve(self, sup: Supervisor, reload: Reload | None = None, glance: Glance | None = None) -> None:
        """Start answering on the bound sockets; returns once uvicorn listens.
        ``reload``: the daemon's, which ``/v1/admin/reload`` calls; ``glance``:
        the history the status page draws."""
        self.door.started = time.time()
        _check_files(self.settings.max_connections)
        app = Admission(create_app(sup, self.door, self.operators, reload, glance), self.door)
        config = uvicorn.Config(
            AccessLog(LastResort(app), self.door),
            http=DoorProtocol.for_door(self.door),  # h11, held to the door's limits; never httptools by default
            lifespan="off",  # nothing to set up, and a failing lifespan would sys.exit() this thread
            log_config=None,  # the daemon's logging stays as it is
            access_log=False,
            proxy_headers=False,
            ws="none",
            backlog=_BACKLOG,
            timeout_graceful_shutdown=1,
        )
        for name in ("uvicorn", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("uvicorn.error").addFilter(QUIET)  # a flood of bad requests is one line in 10 s
        self._server = server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, args=(server,), name="gpuvisor-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise EndpointError(f"the HTTP listener did not start: {self._error or 'it took too long'}")
            time.sleep(0.01)
        log.info("HTTP serving %s", ", ".join(self.listening))

    def _run(self, server: uvicorn.Server) -> None:
        try:
            asyncio.run(server.serve(sockets=self._sockets))
        except BaseException as exc:  # noqa: BLE001 - said by serve() or logged; the daemon goes on without HTTP
            self._error = exc
            log.error("the HTTP listener stopped: %s: %s", type(exc).__name__, exc)

    def drain(self) -> None:
        """New requests get 503 from now on, and /health says draining;
        those already accepted go on."""
        self.door.draining = True

    def stop(self, grace: float) -> None:
        """Close the listeners; answers still being written get ``grace``
        seconds, then are cut. Returns once the HTTP thread has ended."""
        self.door.draining = True
        server, thread = self._server, self._thread
        if server is not None and thread is not None:
            server.config.timeout_graceful_shutdown = max(1, math.ceil(grace))  # whole seconds, as uvicorn types it
            server.should_exit = True
            thread.join(grace + 5.0)
            if thread.is_alive():
                server.force_exit = True
                thread.join(5.0)
        self.close()

    def close(self) -> None:
        """The sockets and our socket files (never another daemon's)."""
        for sock in self._sockets:
            sock.close()
        for path, bound in self._files:
            release_path(path, bound)
        self._sockets, self._files = [], []

    def reload(self, settings: HttpSettings | None) -> str | None:
        """A reload: the model table, the tokens (read again: a token is
        revoked by deleting its line), the allowed origins and every limit
        change now (a connection's limits apply to connections that open
        after). New addresses need a restart; until then everything stays
        as it was, so the tokens never fall off an address that was bound
        needing them, nor does a tokenless one lose its opt-in. Returns
        why the listener kept its settings, or None."""
        kept = None
        if settings is None or settings.listen != self.settings.listen:
            kept = "[http] listen changed; the HTTP listener keeps its settings until the daemon restarts"
        elif not (settings.token_file or settings.admin_token_file) and (
            self.settings.token_file or self.settings.admin_token_file
        ):
            kept = "[http] token_file removed; the HTTP listener keeps its settings until the daemon restarts"
        else:
            try:
                tokens, admin_tokens = read_all_tokens(settings)
            except EndpointError as exc:
                kept = f"the HTTP listener keeps its settings: {exc}"
        if kept is not None or settings is None:
            log.warning("reload: %s", kept)
            return kept
        self.settings = settings
        self.door.settings, self.door.tokens, self.door.admin_tokens = settings, tokens, admin_tokens
        _check_files(settings.max_connections)
        return None


def _check_files(connections: int) -> None:
    """Say so when the process may open fewer files than ``max_connections``
    needs: past that limit an accept fails, and a new connection waits in
    the backlog instead of being closed at once."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < connections + _OWN_FILES:
        log.warning(
            "[http] max_connections = %d needs about %d open files, but this process may open %d "
            "(LimitNOFILE= under systemd, ulimit -n in a shell)",
            connections,
            connections + _OWN_FILES,
            soft,
        )
