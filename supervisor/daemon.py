"""``gpuvisor serve``: the supervisor behind a front socket for local clients.

::

    clients (DEALER) ──▶ front ROUTER ─┐
                                       │   main thread (this module)
    signal wake-up fd (SIGTERM/INT/HUP)┼─▶ poll ──▶ decode request ──▶ Supervisor API ──▶ core loop
    reply wake-up pipe ◀───────────────┘        ◀── Future done-callback posts (client, id, Future)
                                       send the one reply, or drop it if the client is gone

The main thread owns the front socket and nothing else: requests become
calls on the thread-safe ``Supervisor``, whose Futures' done-callbacks (run
on the core loop thread) only queue the reply and wake this loop. Every
request gets exactly one reply; a reply for a client that went away is
dropped (``ROUTER_MANDATORY`` turns that into an error we can see).

Signals: SIGTERM or SIGINT drain and exit 0; a second SIGINT stops at once,
cancelling what is queued; SIGHUP reloads the configuration file.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION, GpuvisorError, JobCancelled, ShuttingDown, UnknownMode
from protocol.client import BadRequest, ClientRequest, Request, decode_request, encode_chunk, encode_reply
from supervisor import config as config_mod
from supervisor.api import Supervisor
from supervisor.commands import drain_wakeups
from supervisor.endpoint import EndpointError, bind_front, default_endpoint, release_ipc
from supervisor.sdnotify import Notifier

log = logging.getLogger("gpuvisor")

_EXTEND_EVERY_S = 5.0  # while draining, ask systemd for more stop time this often
_TICK_S = 1.0


@dataclass(frozen=True)
class _Chunk:
    seq: int
    value: Any


class Daemon:
    def __init__(self, config_path: str | Path | None = None, endpoint: str | None = None,
                 notifier: Notifier | None = None):  # fmt: skip
        self.config_path = config_path
        self.config = config_mod.load(config_path)  # ConfigError: the caller exits 6
        self.endpoint = endpoint or self.config.daemon.endpoint or default_endpoint()
        self.notifier = notifier or Notifier.from_environ()
        # Replies and chunks, in the order the core loop produced them.
        self._replies: collections.deque[tuple[tuple[bytes, ...], Any, Future | _Chunk]] = collections.deque()
        self._pending: dict[tuple[tuple[bytes, ...], Any], Future] = {}  # (client, request id) -> job, for cancel
        self._signals: list[int] = []
        self._stopper: threading.Thread | None = None
        self._bound: tuple[int, int] | None = None  # the socket file we made: (st_dev, st_ino)

    # ------------------------------------------------------------ running

    def run(self) -> int:
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)
        front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
        wake_r, wake_w = os.pipe()
        sig_r, sig_w = os.pipe()
        for fd in (wake_r, wake_w, sig_r, sig_w):
            os.set_blocking(fd, False)
        self._wake_w = wake_w
        auth = None
        sup: Supervisor | None = None
        old_handlers = {}
        try:
            auth = self._curve(ctx, front)
            self._bound = bind_front(
                front, self.endpoint, group=self.config.daemon.socket_group, curve=auth is not None
            )
            old_wakeup = signal.set_wakeup_fd(sig_w)  # before the worker exists: a signal now is handled
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                old_handlers[sig] = signal.signal(sig, lambda signum, frame: self._signals.append(signum))
            sup = Supervisor(self.config).start()
            log.info("serving %s (pid %d, config %s)", self.endpoint, os.getpid(), self.config.source)
            self.notifier.ready()
            self._loop(sup, front, wake_r, sig_r)
            return 0
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if old_handlers:
                signal.set_wakeup_fd(old_wakeup)
            if sup is not None and self._stopper is None:
                sup.shutdown(drain=False)  # an error got us here: never leave the worker behind
            if self._stopper is not None:
                self._stopper.join()
            self._flush_replies(front)
            front.close(linger=500)  # the last replies get out
            if auth is not None:
                auth.stop()
            ctx.term()
            for fd in (wake_r, wake_w, sig_r, sig_w):
                os.close(fd)
            release_ipc(self.endpoint, self._bound)

    def _curve(self, ctx: zmq.Context, front: zmq.Socket):
        """CURVE: encryption plus a list of allowed client keys (zmq.auth)."""
        settings = self.config.daemon
        if not settings.curve_secret_key:
            return None
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        clients = settings.curve_clients_dir
        if clients == "*" or not os.path.isdir(clients) or not any(f.endswith(".key") for f in os.listdir(clients)):
            raise EndpointError(
                f"curve_clients_dir {clients!r} must be a directory holding the allowed clients' public "
                "certificates (*.key); '*' (any key) would authenticate nobody"
            )
        try:
            public, secret = load_certificate(settings.curve_secret_key)
        except (OSError, ValueError) as exc:
            raise EndpointError(f"curve_secret_key {settings.curve_secret_key!r}: {exc}") from None
        if secret is None:
            raise EndpointError(f"{settings.curve_secret_key} holds no secret key")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        try:
            auth.configure_curve(domain="*", location=clients)
            front.curve_secretkey = secret
            front.curve_publickey = public
            front.curve_server = True
        except BaseException:
            auth.stop()
            raise
        return auth

    def _loop(self, sup: Supervisor, front: zmq.Socket, wake_r: int, sig_r: int) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        poller.register(sig_r, zmq.POLLIN)
        watchdog = self.notifier.watchdog_interval
        next_beat = time.monotonic()
        next_extend = 0.0
        while True:
            now = time.monotonic()
            wait = _TICK_S if watchdog is None else max(0.0, min(_TICK_S, next_beat - now))
            events = dict(poller.poll(wait * 1000))
            if sig_r in events:
                drain_wakeups(sig_r)
            while self._signals:
                self._on_signal(sup, self._signals.pop(0))
            if front in events:
                self._drain_front(sup, front)
            if wake_r in events:
                drain_wakeups(wake_r)
            self._flush_replies(front)
            now = time.monotonic()
            # Pinged only while the core loop is turning: a stuck loop gets the service restarted.
            if watchdog is not None and now >= next_beat and sup.healthy(max_age=watchdog):
                self.notifier.watchdog()
                next_beat = now + watchdog
            status = sup.status()
            self.notifier.status_changed(
                f"{status['state']}: mode {status['mode'] or '-'}, worker {status['worker_pid'] or '-'}, "
                f"{status['queued']} queued, {status['in_flight']} running"
            )
            if self._stopper is not None:
                if not self._stopper.is_alive():
                    return
                if now >= next_extend:  # a long drain: ask systemd for more time, a little at a time
                    self.notifier.extend_timeout(_EXTEND_EVERY_S * 3)
                    next_extend = now + _EXTEND_EVERY_S

    # ------------------------------------------------------------ signals and stop

    def _on_signal(self, sup: Supervisor, signum: int) -> None:
        if signum == signal.SIGHUP:
            self._reload(sup)
        elif signum == signal.SIGINT and self._stopper is not None:
            log.warning("second SIGINT: stopping now; queued jobs are cancelled")
            threading.Thread(target=sup.shutdown, kwargs={"drain": False}, name="gpuvisor-stop-now").start()
        else:
            log.info("%s: draining, then exiting", signal.Signals(signum).name)
            self._stop(sup, drain=True)

    def _stop(self, sup: Supervisor, drain: bool) -> None:
        if self._stopper is None:
            self.notifier.stopping()
            self._stopper = threading.Thread(target=self._shutdown, args=(sup, drain), name="gpuvisor-stop")
            self._stopper.start()
        elif not drain:
            threading.Thread(target=sup.shutdown, kwargs={"drain": False}, name="gpuvisor-stop-now").start()

    def _shutdown(self, sup: Supervisor, drain: bool) -> None:
        try:
            sup.shutdown(drain=drain)
        finally:
            self._wake()  # the loop exits now, not at its next tick

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def _reload(self, sup: Supervisor) -> None:
        self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path)
        except GpuvisorError as exc:
            log.error("SIGHUP: keeping the running configuration; the file has a mistake: %s", exc)
        else:
            sup.reload(new)
            self.config = new
        self.notifier.ready()

    # ------------------------------------------------------------ requests

    def _drain_front(self, sup: Supervisor, front: zmq.Socket) -> None:
        while True:
            try:
                identity, *frames = front.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # The route back: the routing id, plus the empty delimiter a REQ
            # client puts first (and expects back), so REQ clients work too.
            client: tuple[bytes, ...] = (identity,)
            if len(frames) >= 2 and frames[0] == b"":
                client, frames = (identity, b""), frames[1:]
            try:
                request = decode_request(frames)
            except GpuvisorError as exc:  # BadRequest, or a ProtocolError from unpacking
                log.warning("bad request from client %s: %s", client[0].hex(), exc.message)
                self._reply_now(front, client, getattr(exc, "request_id", None), error=exc)
                continue
            try:
                self._handle(sup, front, client, request)
            except (GpuvisorError, TypeError, ValueError) as exc:  # raised by the API at once (QueueFull, ...)
                error = exc if isinstance(exc, GpuvisorError) else BadRequest(str(exc), request.id)
                self._reply_now(front, client, request.id, error=error)

    def _handle(self, sup: Supervisor, front: zmq.Socket, client: tuple[bytes, ...], request: ClientRequest) -> None:
        kind, args = request.kind, request.args
        if kind is Request.PING:
            self._reply_now(
                front, client, request.id, value={"pong": True, "pid": os.getpid(), "version": PROTOCOL_VERSION}
            )
        elif kind is Request.STATUS:
            status = sup.status()
            status.update(daemon_pid=os.getpid(), endpoint=self.endpoint, modes=sorted(sup.config.modes))
            self._reply_now(front, client, request.id, value=status)
        elif kind is Request.CANCEL:
            future = self._pending.get((client, args["target"]))
            self._reply_now(
                front, client, request.id, value={"cancelled": bool(future is not None and future.cancel())}
            )
        elif kind is Request.SHUTDOWN:
            self._reply_now(front, client, request.id, value={"stopping": True, "drain": args["drain"]})
            self._stop(sup, drain=args["drain"])
        elif self._stopper is not None:
            self._reply_now(front, client, request.id, error=ShuttingDown("the daemon is shutting down"))
        elif kind is Request.SUBMIT:
            on_chunk = self._chunk_sink(client, request.id) if args["stream"] else None
            future = sup.submit(args["task"], args["payload"], mode=args["mode"], timeout=args["timeout"],
                                retries=args["retries"], on_chunk=on_chunk)  # fmt: skip
            self._pending[(client, request.id)] = future
            self._when_done(client, request.id, future)
        elif kind is Request.SWITCH:
            self._when_done(client, request.id, sup.switch_mode(args["mode"]))
        elif kind is Request.RESTART:
            if args["mode"] is not None and sup.config.mode(args["mode"]) is None:
                raise UnknownMode(f"unknown mode {args['mode']!r}")
            self._when_done(client, request.id, sup.restart(args["mode"]))

    def _chunk_sink(self, client: tuple[bytes, ...], request_id: Any) -> Callable[[Any], None]:
        """Where a streamed job's chunks go: the same queue as the replies, so
        a client gets every chunk before the reply that ends the stream."""
        seq = itertools.count(1)

        def sink(value: Any) -> None:  # on the core loop thread: queue and wake, nothing more
            self._replies.append((client, request_id, _Chunk(next(seq), value)))
            self._wake()

        return sink

    def _when_done(self, client: tuple[bytes, ...], request_id: Any, future: Future) -> None:
        def done(f: Future) -> None:  # runs on the core loop thread: queue and wake, nothing more
            self._replies.append((client, request_id, f))
            self._wake()

        future.add_done_callback(done)

    def _flush_replies(self, front: zmq.Socket) -> None:
        while self._replies:
            client, request_id, future = self._replies.popleft()
            if isinstance(future, _Chunk):
                self._send(front, client, request_id, encode_chunk(request_id, future.seq, future.value))
                continue
            self._pending.pop((client, request_id), None)
            if future.cancelled():
                self._reply_now(front, client, request_id, error=JobCancelled("cancelled at the client's request"))
                continue
            exc = future.exception()
            if exc is not None and not isinstance(exc, GpuvisorError):
                exc = GpuvisorError(f"{type(exc).__name__}: {exc}")
            self._reply_now(front, client, request_id, value=None if exc else future.result(), error=exc)

    def _reply_now(self, front: zmq.Socket, client: tuple[bytes, ...], request_id: Any, *, value: Any = None,
                   error: GpuvisorError | None = None) -> None:  # fmt: skip
        self._send(front, client, request_id, encode_reply(request_id, value=value, error=error))

    def _send(self, front: zmq.Socket, client: tuple[bytes, ...], request_id: Any, frames: list) -> None:
        try:
            # NOBLOCK: with ROUTER_MANDATORY a client that does not read its
            # replies would otherwise block this loop (signals included) forever.
            front.send_multipart([*client, *frames], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("dropped a message to %r: client %s is not reading its replies", request_id, client[0].hex())
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client went away; its reply has nowhere to go
            log.debug("dropped a message to %r for client %s: %s", request_id, client[0].hex(), exc)
