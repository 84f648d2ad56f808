"""``gpuvisor serve``: the supervisor behind a front socket for local clients.

::

    clients (DEALER) ──▶ front ROUTER ─┐
                                       │   main thread (this module), one turn:
    signal wake-up fd (SIGTERM/INT/HUP)┼─▶ poll ─▶ signals
    reply wake-up pipe ◀───────────────┘        ─▶ read at most READ_BUDGET requests ─▶ Supervisor API ─▶ core loop
                                                ─▶ replies the core loop finished, to each client's backlog
                                                ─▶ send what each client's pipe takes (flow.py)
                                                ─▶ held requests of clients that caught up

The main thread owns the front socket and nothing else: requests become
calls on the thread-safe ``Supervisor``, whose Futures' done-callbacks (run
on the core loop thread) only queue the reply and wake this loop. Every
request gets exactly one reply, and a client that reads gets every reply
and chunk in order; one that does not is slowed, then cut off (see
``supervisor.service.flow``). Each turn reads a bounded number of requests (libzmq's
ROUTER takes them from the clients in turn), so signals, replies and other
clients are served every turn whatever one client sends.

Signals: SIGTERM or SIGINT drain and exit 0; a second SIGINT stops at once,
cancelling what is queued; SIGHUP reloads the configuration file.

With ``[http]`` in the configuration, an HTTP listener (OpenAI's API,
health, metrics: ``supervisor.service.http``) runs on a thread of its own
over the same ``Supervisor``. A stop drains both doors: from its first
moment new HTTP requests get 503, requests already accepted finish with the
queue, and the listener is closed before the daemon exits, all inside
``[daemon] drain_timeout``.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Forbidden,
    GpuvisorError,
    JobCancelled,
    ShuttingDown,
    UnknownMode,
)
from protocol.client import BadRequest, ClientRequest, Request, decode_request, encode_chunk, encode_reply
from protocol.frames import recv_message
from supervisor import config as config_mod
from supervisor.api import Supervisor
from supervisor.client.endpoint import default_endpoint
from supervisor.events import DEFAULT_BUFFER, EventStream
from supervisor.mailbox import Mailbox, empty_pipe
from supervisor.service import reloading
from supervisor.service.connections import ConnectionCap
from supervisor.service.flow import FlowControl, Peer, Route
from supervisor.service.front import EndpointError, bind_front, release_ipc
from supervisor.service.http import open_http
from supervisor.service.operators import Operators
from supervisor.service.sdnotify import Notifier
from supervisor.service.secret_files import check_secret_file, check_trusted_folder

if TYPE_CHECKING:
    from supervisor.service.http.server import HttpFront

log = logging.getLogger("gpuvisor")

_EXTEND_EVERY_S = 5.0  # while draining, ask systemd for more stop time this often
_TICK_S = 1.0
READ_BUDGET = 32
"""Requests read from the front socket per loop turn (and as many held ones
handled): one turn stays around a few milliseconds however fast a client
sends."""
_SWITCH_INTERVAL_S = 0.0005
"""The GIL hand-over interval in the daemon (Python's default is 5 ms). The
front loop and the core loop share one interpreter: while the front loop is
busy with a flooding client, each step of another client's job waits this
long for the core loop to get the GIL (docs/performance.md)."""
DUTY = 0.7
"""While requests keep coming faster than the loop handles them (a turn used
its whole READ_BUDGET), it reads no new ones for 3/7 of the time that turn
took (replies and signals are still served): it shares the CPU and the GIL
with the core loop and the worker, and a client that floods it must not take
their share (docs/performance.md)."""
_EXIT_FLUSH_S = 5.0  # at exit, send what clients still read for at most this long ...
_EXIT_STALL_S = 0.25  # ... and stop when nothing went out for this long


SNDHWM_FRONT = 64
"""Replies libzmq queues for one client before a send says EAGAIN."""
_OPERATORS_ONLY = frozenset({Request.SHUTDOWN, Request.SWITCH, Request.RESTART, Request.UNLOAD, Request.RELOAD})


def _admin_keys(folder: str) -> frozenset[str]:
    """The z85 public keys of the certificates (``*.key``) in ``folder``."""
    if not folder:
        return frozenset()
    from zmq.auth import load_certificates

    try:
        return frozenset(key.decode() for key in load_certificates(folder))
    except (OSError, ValueError) as exc:
        raise EndpointError(f"cannot read the certificates in {folder}: {exc}") from None


class _Keys:
    """The CURVE keys let in: the clients' and the admins'."""

    def __init__(self, keys: frozenset[str]):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:  # pyzmq's authenticator gives the key in z85
        return key.decode() in self.keys


@dataclass(frozen=True)
class _Chunk:
    seq: int
    value: Any


EVENTS_AHEAD = 16
"""A follower's events waiting in its backlog (flow.py) at most; the rest wait
in its own bounded queue, which drops the oldest when it does not read."""


@dataclass(eq=False)
class _Following:
    """An ``events`` request: its events go out as chunks until it is cancelled."""

    route: Route
    request_id: Any
    stream: EventStream
    future: Future  # its one reply; cancelled by the client's cancel, a cut-off, or its connection going
    seq: Any = None

    def __post_init__(self) -> None:
        self.seq = itertools.count(1)


class Daemon:
    def __init__(self, config_path: str | Path | None = None, endpoint: str | None = None,
                 notifier: Notifier | None = None):  # fmt: skip
        self.config_path = config_path
        self.config = config_mod.load(config_path)  # ConfigError: the caller exits 6
        self.endpoint = endpoint or self.config.daemon.endpoint or default_endpoint()
        self.notifier = notifier or Notifier.from_environ()
        # Replies and chunks the core loop finished, in the order it did: (client, request id, Future | chunk).
        self._replies: Mailbox[tuple[Route, Any, Future | _Chunk]] = Mailbox()
        self._stop_began = 0.0
        self._flow: FlowControl  # made in run(), with the front socket
        self._signals: list[int] = []
        self._stopper: threading.Thread | None = None
        self._bound: tuple[int, int] | None = None  # the socket file we made: (st_dev, st_ino)
        self._http: HttpFront | None = None
        self._operators = Operators()  # set in run(), with the CURVE keys
        self._connections: ConnectionCap | None = None  # made in run(), once the front socket is bound
        self._reloading = threading.Lock()
        self._following: dict[tuple[Route, Any], _Following] = {}  # the events requests being served

    # ------------------------------------------------------------ running

    def run(self) -> int:
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full pipe says EAGAIN: flow.py keeps the message
        # What libzmq keeps for a client that does not read, out of flow.py's sight (and never freed while
        # the connection lasts): 1,000 messages by default, up to 64 MiB each. Past SNDHWM_FRONT the
        # replies wait in flow.py's backlog, where a client that reads nothing is cut off.
        front.setsockopt(zmq.SNDHWM, SNDHWM_FRONT)
        front.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
        self._flow = FlowControl(front, self._encode, lambda future: future.cancel())
        sig_r, sig_w = os.pipe()
        for fd in (sig_r, sig_w):
            os.set_blocking(fd, False)
        auth = None
        sup: Supervisor | None = None
        old_handlers = {}
        old_interval = sys.getswitchinterval()
        try:
            settings = self.config.daemon
            if settings.curve_admins_dir:
                check_trusted_folder(settings.curve_admins_dir, "[daemon] curve_admins_dir")
            try:
                self._operators = Operators(settings.admin_group, _admin_keys(settings.curve_admins_dir))
            except ValueError as exc:
                raise EndpointError(str(exc)) from None
            auth = self._curve(ctx, front)
            self._bound = bind_front(front, self.endpoint, group=settings.socket_group, curve=auth is not None,
                                     allow_unauthenticated_tcp=settings.allow_unauthenticated_tcp)  # fmt: skip
            http = self.config.http
            self._connections = ConnectionCap(front, settings.max_connections, settings.max_connections_per_user,
                                              reserved=http.max_connections if http is not None else 0)  # fmt: skip
            self._http = open_http(
                self.config, self.endpoint
            )  # bound now: a bad address stops us before a worker starts
            old_wakeup = signal.set_wakeup_fd(sig_w)  # before the worker exists: a signal now is handled
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                old_handlers[sig] = signal.signal(sig, lambda signum, frame: self._signals.append(signum))
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
            sup = Supervisor(self.config).start()
            if self._http is not None:
                self._http.serve(sup, reload=lambda: self.reload(sup))
            log.info("serving %s (pid %d, config %s)", self.endpoint, os.getpid(), self.config.source)
            self.notifier.ready()
            self._loop(sup, front, sig_r)
            return 0
        finally:
            if sup is not None and self._stopper is None:
                sup.shutdown(drain=False)  # an error got us here: never leave the worker behind
            if self._stopper is not None:
                self._stopper.join()
            if self._http is not None:
                self._http.stop(grace=0.0)  # already stopped after a drain; closed at once after an error
            self._flush_at_exit()
            self._replies.close()
            sys.setswitchinterval(old_interval)
            if self._connections is not None:
                front.disable_monitor()
                self._connections.close()
            front.close(linger=500)  # what libzmq still holds for clients that read
            if auth is not None:
                auth.stop()
            ctx.term()
            release_ipc(self.endpoint, self._bound)
            # Last: until the socket file is gone, a second SIGTERM is still
            # ours (a drain finishing), never the default that kills with -15.
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if old_handlers:
                signal.set_wakeup_fd(old_wakeup)
            for fd in (sig_r, sig_w):
                os.close(fd)

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
        check_trusted_folder(clients, "[daemon] curve_clients_dir")  # whoever may change it decides who gets in
        check_secret_file(settings.curve_secret_key, "[daemon] curve_secret_key")
        allowed = _admin_keys(clients) | self._operators.admin_keys  # an admin key may connect, as a client
        try:
            public, secret = load_certificate(settings.curve_secret_key)
        except (OSError, ValueError) as exc:
            raise EndpointError(f"curve_secret_key {settings.curve_secret_key!r}: {exc}") from None
        if secret is None:
            raise EndpointError(f"{settings.curve_secret_key} holds no secret key")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        try:
            auth.configure_curve_callback(domain="*", credentials_provider=_Keys(allowed))
            front.curve_secretkey = secret
            front.curve_publickey = public
            front.curve_server = True
        except BaseException:
            auth.stop()
            raise
        return auth

    def _loop(self, sup: Supervisor, front: zmq.Socket, sig_r: int) -> None:
        wake_r = self._replies.fd
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        poller.register(sig_r, zmq.POLLIN)
        pausing = zmq.Poller()  # the same without the front socket: replies and signals, no new requests
        pausing.register(wake_r, zmq.POLLIN)
        pausing.register(sig_r, zmq.POLLIN)
        connections = self._connections
        if connections is not None:  # connections are counted (and cut past the bounds) while paused too
            poller.register(connections.monitor, zmq.POLLIN)
            pausing.register(connections.monitor, zmq.POLLIN)
        flow = self._flow
        watchdog = self.notifier.watchdog_interval
        next_beat = time.monotonic()
        next_extend = 0.0
        pause_until = 0.0
        while True:
            now = time.monotonic()
            wait = _TICK_S if watchdog is None else max(0.0, min(_TICK_S, next_beat - now))
            retry = flow.retry_in()
            if retry is not None:
                wait = min(wait, retry)
            if self._events_due():
                wait = 0.0
            paused = now < pause_until
            if paused:
                events = dict(pausing.poll(math.ceil(min(wait, pause_until - now) * 1000)))
            else:
                events = dict(poller.poll(math.ceil(wait * 1000)))
            turn = time.monotonic()
            if connections is not None and connections.monitor in events:
                connections.handle()
            if sig_r in events:
                empty_pipe(sig_r)
            while self._signals:
                self._on_signal(sup, self._signals.pop(0))
            handled = self._read_front(sup, front) if front in events else 0
            now = time.monotonic()
            self._pump_events()  # before the replies: a request's last events go out before its answer
            self._take_replies()
            flow.flush(now)
            if not paused:
                for peer, frames in flow.release(READ_BUDGET - handled):
                    self._serve(sup, peer, frames)
                    handled += 1
                flow.flush(now)
            # Pinged only while the core loop is turning: a stuck loop gets the service restarted.
            if watchdog is not None and now >= next_beat and sup.healthy(max_age=watchdog):
                self.notifier.watchdog()
                next_beat = now + watchdog
            status = sup.status()
            self.notifier.status_changed(
                f"{status['state']}: mode {status['mode'] or '-'}, worker {status['worker_pid'] or '-'}, "
                f"{status['queued']} queued, {status['in_flight']} running"
            )
            if handled >= READ_BUDGET:  # a pause from requests, not from replies or signals
                pause_until = time.monotonic() + (time.monotonic() - turn) * (1 - DUTY) / DUTY
            if self._stopper is not None:
                if not self._stopper.is_alive():
                    return
                # A long drain asks systemd for more time, a little at a time,
                # never past the drain budget and the worker's stop after it.
                limit = self._stop_began + self.config.daemon.drain_timeout + self.config.stop_timeout + 5.0
                if now >= next_extend and now < limit:
                    self.notifier.extend_timeout(min(_EXTEND_EVERY_S * 3, limit - now))
                    next_extend = now + _EXTEND_EVERY_S

    def _flush_at_exit(self) -> None:
        """The last replies (a drain's included) reach every client that still
        reads; one that does not costs the exit at most ``_EXIT_STALL_S``."""
        flow = self._flow
        started = last_sent = time.monotonic()
        while True:
            self._pump_events()
            self._take_replies()
            now = time.monotonic()
            if flow.flush(now):
                last_sent = now
            if not flow.waiting() or now - started > _EXIT_FLUSH_S or now - last_sent > _EXIT_STALL_S:
                return
            time.sleep(0.002)

    # ------------------------------------------------------------ signals and stop

    def _on_signal(self, sup: Supervisor, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload(sup)
        elif signum == signal.SIGINT and self._stopper is not None:
            log.warning("second SIGINT: stopping now; queued jobs are cancelled")
            self._stop(sup, drain=False)
        else:
            log.info("%s: draining, then exiting", signal.Signals(signum).name)
            self._stop(sup, drain=True)

    def _stop(self, sup: Supervisor, drain: bool, timeout: float | None = None) -> None:
        """A drain is bounded by ``[daemon] drain_timeout`` (and by ``timeout``,
        a stop request's own): what has not run by then is cancelled with
        ``JobCancelled`` and the worker is stopped."""
        budget = min(self.config.daemon.drain_timeout, timeout or float("inf"))
        if self._stopper is None:
            self.notifier.stopping()
            if self._http is not None:
                self._http.drain()
            self._stop_began = time.monotonic()
            self._stopper = threading.Thread(target=self._shutdown, args=(sup, drain, budget), name="gpuvisor-stop")
            self._stopper.start()
        else:  # a second, tighter word: the tightest bound wins (shutdown() calls may overlap)
            threading.Thread(target=sup.shutdown, args=(drain, budget if drain else None), name="gpuvisor-stop-now",
                             daemon=True).start()  # fmt: skip

    def _shutdown(self, sup: Supervisor, drain: bool, budget: float) -> None:
        try:
            sup.shutdown(drain=drain, timeout=budget if drain else None)
        finally:
            try:
                if self._http is not None:  # every job has its outcome now: let the answers go out, then close
                    self._http.stop(grace=max(1.0, self._stop_began + budget - time.monotonic()) if drain else 1.0)
            finally:
                self._replies.wake()  # the loop exits now, not at its next tick

    def reload(self, sup: Supervisor) -> dict[str, Any]:
        """Read the file again and swap it in (SIGHUP, ``gpuvisor reload``,
        the HTTP door's admin route: one at a time), or keep the running
        configuration when the file has a mistake. Returns what changed, and
        what waits for a restart (``supervisor.service.reloading``)."""
        with self._reloading:
            self.notifier.reloading()
            try:
                new = config_mod.load(self.config_path)
            except GpuvisorError as exc:
                log.error("reload: keeping the running configuration; the file has a mistake: %s", exc)
                return reloading.refused(str(self.config_path) if self.config_path else None, exc.message)
            finally:
                self.notifier.ready()
            loaded = [d["mode"] for d in sup.status().get("devices", ()) if d.get("mode")]
            report = reloading.compare(self.config, new, loaded)
            sup.reload(new)
            self.config = new
            kept = self._http.reload(new.http) if self._http is not None else None
            if kept is None and self._http is None and any(k.split(".")[0] == "http" for k in report["settings"]):
                kept = "[http] applies when the daemon restarts: no HTTP listener runs now"
            if kept is not None:
                report["notes"].append(kept)
            log.info("reload from %s: modes added %s, removed %s, changed %s; settings changed %s%s", new.source,
                     report["added"], report["removed"], report["changed"], report["settings"],
                     "".join(f"; {note}" for note in report["notes"]))  # fmt: skip
            return report

    # ------------------------------------------------------------ requests

    def _read_front(self, sup: Supervisor, front: zmq.Socket) -> int:
        """At most ``READ_BUDGET`` requests; the rest wait for the next turn.
        Returns how many were read."""
        flow = self._flow
        now = time.monotonic()
        for n in range(READ_BUDGET):
            try:
                # The routing id as a Frame: its connection's properties say
                # who the caller is. The header copied, arrays kept as frames.
                identity_frame, *frames = recv_message(front, zmq.NOBLOCK, copied=2, first_frame=True)
            except zmq.Again:
                return n
            identity = identity_frame.bytes
            # The route back: the routing id, plus the empty delimiter a REQ
            # client puts first (and expects back), so REQ clients work too.
            route: Route = (identity,)
            if len(frames) >= 2 and frames[0] == b"":
                route, frames = (identity, b""), frames[1:]
            peer = flow.peer(route, now)
            peer.heard = now
            if peer.caller is None:
                peer.caller = self._operators.caller(identity_frame)
            if peer.cut_off is not None:
                flow.refuse(peer, frames)
            elif peer.admits():
                self._serve(sup, peer, frames)
            else:
                flow.hold(peer, frames, now)
        return READ_BUDGET

    def _serve(self, sup: Supervisor, peer: Peer, frames: list) -> None:
        try:
            request = decode_request(frames, packed_payload=True)  # a payload is forwarded as it came
        except GpuvisorError as exc:  # BadRequest, or a ProtocolError from unpacking
            log.warning("bad request from client %s: %s", peer.route[0].hex(), exc.message)
            self._reply_now(peer, getattr(exc, "request_id", None), error=exc)
            return
        try:
            self._handle(sup, peer, request)
        except (GpuvisorError, TypeError, ValueError) as exc:  # raised by the API at once (bad arguments, Forbidden)
            error = exc if isinstance(exc, GpuvisorError) else BadRequest(str(exc), request.id)
            self._reply_now(peer, request.id, error=error)

    def _handle(self, sup: Supervisor, peer: Peer, request: ClientRequest) -> None:
        kind, args = request.kind, request.args
        if kind is Request.PING:
            self._reply_now(peer, request.id, value={"pong": True, "pid": os.getpid(), "version": PROTOCOL_VERSION})
        elif kind is Request.STATUS:
            status = {**sup.status(), "daemon_pid": os.getpid(), "endpoint": self.endpoint,
                      "http": self._http.listening if self._http is not None else [],
                      "modes": sorted(sup.config.modes), "clients": self._clients_status()}  # fmt: skip
            self._reply_now(peer, request.id, value=status)
        elif kind is Request.MODES:
            self._reply_now(peer, request.id, value=sup.modes())
        elif kind is Request.METRICS:
            self._reply_now(peer, request.id, value=sup.metrics())
        elif kind is Request.EVENTS:  # anyone who may run jobs: the events tell what status() tells, as it happens
            self._follow(sup, peer, request.id, args["buffer"])
        elif kind is Request.CANCEL:  # a queued job never runs; a stream that runs is stopped at its next chunk
            future = peer.jobs.get(args["target"])
            self._reply_now(peer, request.id, value={"cancelled": bool(future is not None and future.cancel())})
        elif kind in _OPERATORS_ONLY and not (peer.caller is not None and peer.caller.operator):
            who = peer.caller.who if peer.caller is not None else "an unknown caller"
            log.warning("refused %s from %s: not an operator", kind.value, who)
            raise Forbidden(f"{kind.value} is for operators: the daemon's own user, root, a member of [daemon] "
                            "admin_group or an admin CURVE key; this caller may only run jobs")  # fmt: skip
        elif kind is Request.SHUTDOWN:
            log.info("%s asked to stop (%s)", peer.caller.who if peer.caller else "?", "drain" if args["drain"]
                     else "no drain")  # fmt: skip
            self._reply_now(peer, request.id, value={"stopping": True, "drain": args["drain"]})
            self._stop(sup, drain=args["drain"], timeout=args["timeout"])
        elif self._stopper is not None:
            self._reply_now(peer, request.id, error=ShuttingDown("the daemon is shutting down"))
        elif kind is Request.SUBMIT:
            on_chunk = self._chunk_sink(peer.route, request.id) if args["stream"] else None
            future = sup.submit_for(peer.client, args["task"], args["payload"], mode=args["mode"], retries=args["retries"],
                                    on_chunk=on_chunk, give_up_after=self._patience(args["timeout"]),
                                    packed=True)  # fmt: skip
            peer.jobs[request.id] = future
            self._when_done(peer.route, request.id, future)
        elif kind is Request.SWITCH:
            self._when_done(peer.route, request.id, sup.switch_mode(args["mode"], device=args["device"]))
        elif kind is Request.RESTART:
            if args["mode"] is not None and sup.config.mode(args["mode"]) is None:
                raise UnknownMode(f"unknown mode {args['mode']!r}")
            self._when_done(peer.route, request.id, sup.restart(args["mode"], device=args["device"]))
        elif kind is Request.UNLOAD:
            self._when_done(peer.route, request.id, sup.unload(args["device"]))
        elif kind is Request.RELOAD:
            self._reply_now(peer, request.id, value=self.reload(sup))

    # ------------------------------------------------------------ events

    def _follow(self, sup: Supervisor, peer: Peer, request_id: Any, buffer: int | None) -> None:
        """An ``events`` request: the supervisor's events, as chunks, until
        the client cancels it (or is cut off, or goes); a reply ends it."""
        stream = sup.events(buffer=DEFAULT_BUFFER if buffer is None else buffer)
        stream.subscription.wake = self._replies.wake
        self._replies.wake()  # for what came before the wake was in place
        future: Future = Future()
        future.add_done_callback(lambda _: stream.close())
        peer.jobs[request_id] = future  # a CANCEL finds it there, and a cut-off cancels it
        self._following[(peer.route, request_id)] = _Following(peer.route, request_id, stream, future)
        self._when_done(peer.route, request_id, future)

    def _pump_events(self) -> None:
        """Each follower's events to its backlog, at most ``EVENTS_AHEAD``
        waiting there: one that does not read loses its oldest in its own
        queue (and is told), and flow control cuts it off as any other."""
        flow = self._flow
        for key, following in list(self._following.items()):
            peer = flow.peers.get(following.route)
            if following.future.done() or (peer is not None and (peer.gone or peer.cut_off is not None)):
                following.future.cancel()
                del self._following[key]
                continue
            room = EVENTS_AHEAD - (len(peer.backlog) if peer is not None else 0)
            if room > 0:
                for told in following.stream.take(room):
                    flow.post(following.route, encode_chunk(following.request_id, next(following.seq), told))
            if following.stream.over:  # the supervisor stopped: every event is out, then the reply
                dropped = following.stream.subscription.dropped_total
                following.future.set_result({"ended": "the supervisor stopped", "dropped": dropped})
                del self._following[key]

    def _events_due(self) -> bool:
        """A follower has events waiting and room for them now."""
        peers = self._flow.peers
        for following in self._following.values():
            peer = peers.get(following.route)
            if following.stream.subscription.pending and (peer is None or len(peer.backlog) < EVENTS_AHEAD):
                return True
        return False

    def _patience(self, timeout: float | None) -> float | None:
        """What a client's ``timeout`` may do. Only the operator's
        ``job_timeout`` stops a worker, and it is a ceiling: a client may
        not ask for more, nor for none (``0``). A client that asks for less
        gives up on its job then (``JobTimeout``), and the worker finishes
        it: a client's short timeout must not cost everyone a worker, a
        reload and the mode's budget."""
        limit = self.config.job_timeout
        if not timeout or (limit and timeout >= limit):
            return None
        return timeout

    def _clients_status(self) -> dict[str, int]:
        flow = self._flow
        peers = flow.peers.values()
        return {
            "connected": sum(1 for p in peers if p.cut_off is None),
            "waiting_replies": sum(len(p.backlog) for p in peers),
            "held_requests": sum(len(p.held) for p in peers),
            "cut_off": flow.counts.cut_off,
            "dropped": flow.counts.dropped,
            "refused": flow.counts.refused,
            "open_connections": self._connections.open if self._connections is not None else 0,
            "refused_connections": self._connections.refused if self._connections is not None else 0,
            "following_events": len(self._following),
        }

    # ------------------------------------------------------------ replies

    def _chunk_sink(self, route: Route, request_id: Any) -> Callable[[Any], None]:
        """Where a streamed job's chunks go: the same queue as the replies, so
        a client gets every chunk before the reply that ends the stream."""
        seq = itertools.count(1)

        def sink(value: Any) -> None:  # on the core loop thread: queue and wake, nothing more
            self._replies.put((route, request_id, _Chunk(next(seq), value)))

        return sink

    def _when_done(self, route: Route, request_id: Any, future: Future) -> None:
        def done(f: Future) -> None:  # runs on the core loop thread: queue and wake, nothing more
            self._replies.put((route, request_id, f))

        future.add_done_callback(done)

    def _take_replies(self) -> None:
        """What the core loop finished goes to each client's backlog, in order;
        it is encoded when it is sent."""
        flow = self._flow
        for route, request_id, item in self._replies.take_all():
            if not isinstance(item, _Chunk):
                peer = flow.peers.get(route)
                if peer is not None and peer.jobs.get(request_id) is item:
                    del peer.jobs[request_id]
            flow.post(route, (request_id, item))

    def _encode(self, request_id: Any, item: Future | _Chunk) -> list:
        if isinstance(item, _Chunk):
            return encode_chunk(request_id, item.seq, item.value)
        if item.cancelled():
            return encode_reply(request_id, error=JobCancelled("cancelled at the client's request"))
        exc = item.exception()
        if exc is not None and not isinstance(exc, GpuvisorError):
            exc = GpuvisorError(f"{type(exc).__name__}: {exc}")
        return encode_reply(request_id, value=None if exc else item.result(), error=exc)

    def _reply_now(self, peer: Peer, request_id: Any, *, value: Any = None, error: GpuvisorError | None = None) -> None:
        self._flow.post(peer.route, encode_reply(request_id, value=value, error=error))
