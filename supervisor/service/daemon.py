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
calls on the thread-safe ``Supervisor`` (``supervisor.service.requests``),
whose Futures' done-callbacks (run on the core loop thread) only queue the
reply and wake this loop (``supervisor.service.replies``). Every
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

import dataclasses
import logging
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from protocol import MAX_MESSAGE_BYTES, GpuvisorError
from supervisor import config as config_mod
from supervisor.api import Supervisor
from supervisor.client.endpoint import default_endpoint
from supervisor.config import Config
from supervisor.config_http import with_page_listener
from supervisor.config_where import ConfigError
from supervisor.mailbox import empty_pipe
from supervisor.service import reloading
from supervisor.service.connections import ConnectionCap
from supervisor.service.curve import certificate_keys, start_curve
from supervisor.service.flow import FlowControl
from supervisor.service.followers import Followers
from supervisor.service.front import EndpointError, bind_front, release_ipc
from supervisor.service.glance import Glance
from supervisor.service.http import open_http
from supervisor.service.operators import Operators
from supervisor.service.replies import Replies, encode
from supervisor.service.requests import Requests
from supervisor.service.sdnotify import Notifier
from supervisor.service.secret_files import check_trusted_folder

if TYPE_CHECKING:
    from zmq.auth.thread import ThreadAuthenticator

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


class Daemon:
    def __init__(
        self,
        config_path: str | Path | None = None,
        endpoint: str | None = None,
        notifier: Notifier | None = None,
        page: str | None = None,
    ):
        """``page``: a loopback ``HOST:PORT`` where the HTTP door listens too,
        for a browser (``gpuvisor serve --ui``), whatever the file says."""
        self.config_path = config_path
        self._page = page
        self.config = self._load()  # ConfigError: the caller exits 6
        self.endpoint = endpoint or self.config.daemon.endpoint or default_endpoint()
        self.notifier = notifier or Notifier.from_environ()
        self._replies = Replies()
        self._stop_began = 0.0
        self._flow: FlowControl  # made in run(), with the front socket
        self._followers: Followers  # made in run(), with the flow control
        self._signals: list[int] = []
        self._stop_thread: threading.Thread | None = None
        self._bound: tuple[int, int] | None = None  # the socket file we made: (st_dev, st_ino)
        self._http: HttpFront | None = None
        self._operators = Operators()  # set in run(), with the CURVE keys
        self._connections: ConnectionCap | None = None  # made in run(), once the front socket is bound
        self._reloading = threading.Lock()
        self._glance = Glance()  # what the status page and `gpuvisor top` draw: one history for all

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
        self._flow = FlowControl(front, encode, lambda future: future.cancel())
        self._followers = Followers(self._flow, self._replies)
        sig_r, sig_w = os.pipe()
        for fd in (sig_r, sig_w):
            os.set_blocking(fd, False)
        auth = None
        sup: Supervisor | None = None
        old_handlers = {}
        old_interval = sys.getswitchinterval()
        try:
            auth = self._start_curve(ctx, front)
            self._bind(front, curve=auth is not None)
            old_wakeup = signal.set_wakeup_fd(sig_w)  # before the worker exists: a signal now is handled
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                old_handlers[sig] = signal.signal(sig, lambda signum, frame: self._signals.append(signum))
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
            sup = Supervisor(self.config).start()
            self._glance.start(sup)
            if self._http is not None:
                self._http.serve(sup, reload=lambda: self.reload(sup), glance=self._glance)
                for shown in self._http.listening:
                    if shown.startswith("http"):  # a browser reaches TCP, never a unix socket
                        log.info("status page: %s/ui", shown)
            log.info("serving %s (pid %d, config %s)", self.endpoint, os.getpid(), self.config.source)
            self.notifier.ready()
            self._loop(sup, self._requests(sup), front, sig_r)
            return 0
        finally:
            if sup is not None and self._stop_thread is None:
                sup.shutdown(drain=False)  # an error got us here: never leave the worker behind
            if self._stop_thread is not None:
                self._stop_thread.join()
            self._glance.close()  # its stream ended with the supervisor
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

    def _start_curve(self, ctx: zmq.Context, front: zmq.Socket) -> ThreadAuthenticator | None:
        """Who may operate, and CURVE on the front socket when it is
        configured. Returns the CURVE authenticator, or None."""
        settings = self.config.daemon
        if settings.curve_admins_dir:
            check_trusted_folder(settings.curve_admins_dir, "[daemon] curve_admins_dir")
        try:
            self._operators = Operators(settings.admin_group, certificate_keys(settings.curve_admins_dir))
        except ValueError as exc:
            raise EndpointError(str(exc)) from None
        return start_curve(ctx, front, settings, self._operators.admin_keys)

    def _bind(self, front: zmq.Socket, curve: bool) -> None:
        """The front socket bound with its connections counted, and the HTTP
        listener bound: a bad address stops us before a worker starts."""
        settings = self.config.daemon
        self._bound = bind_front(
            front,
            self.endpoint,
            group=settings.socket_group,
            curve=curve,
            allow_unauthenticated_tcp=settings.allow_unauthenticated_tcp,
        )
        http = self.config.http
        reserved = http.max_connections if http is not None else 0  # the HTTP door's own connections
        self._connections = ConnectionCap(
            front, settings.max_connections, settings.max_connections_per_user, reserved=reserved
        )
        self._http = open_http(self.config, self.endpoint)

    def _requests(self, sup: Supervisor) -> Requests:
        return Requests(
            sup,
            self._flow,
            self._replies,
            self._followers,
            self._operators,
            endpoint=self.endpoint,
            http=self._http,
            connections=self._connections,
            stopping=lambda: self._stop_thread is not None,
            stop=lambda drain, timeout: self._begin_stop(sup, drain, timeout),
            reload=lambda: self.reload(sup),
            glance=self._glance,
        )

    def _loop(self, sup: Supervisor, requests: Requests, front: zmq.Socket, sig_r: int) -> None:
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
            if self._followers.due():
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
            handled = requests.read(front, READ_BUDGET) if front in events else 0
            now = time.monotonic()
            self._followers.pump()  # before the replies: a request's last events go out before its answer
            self._replies.post(flow)
            flow.flush(now)
            if not paused:
                for peer, frames in flow.release(READ_BUDGET - handled):
                    requests.serve(peer, frames)
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
            if self._stop_thread is not None:
                if not self._stop_thread.is_alive():
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
            self._followers.pump()
            self._replies.post(flow)
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
        elif signum == signal.SIGINT and self._stop_thread is not None:
            log.warning("second SIGINT: stopping now; queued jobs are cancelled")
            self._begin_stop(sup, drain=False)
        else:
            log.info("%s: draining, then exiting", signal.Signals(signum).name)
            self._begin_stop(sup, drain=True)

    def _begin_stop(self, sup: Supervisor, drain: bool, timeout: float | None = None) -> None:
        """A drain is bounded by ``[daemon] drain_timeout`` (and by ``timeout``,
        a stop request's own): what has not run by then is cancelled with
        ``JobCancelled`` and the worker is stopped."""
        budget = min(self.config.daemon.drain_timeout, timeout or float("inf"))
        if self._stop_thread is None:
            self.notifier.stopping()
            if self._http is not None:
                self._http.drain()
            self._stop_began = time.monotonic()
            args = (sup, drain, budget)
            self._stop_thread = threading.Thread(target=self._stop_supervisor_and_http, args=args, name="gpuvisor-stop")
            self._stop_thread.start()
        else:  # a second, tighter word: the tightest bound wins (shutdown() calls may overlap)
            tighter = (drain, budget if drain else None)
            threading.Thread(target=sup.shutdown, args=tighter, name="gpuvisor-stop-now", daemon=True).start()

    def _stop_supervisor_and_http(self, sup: Supervisor, drain: bool, budget: float) -> None:
        try:
            sup.shutdown(drain=drain, timeout=budget if drain else None)
        finally:
            try:
                if self._http is not None:  # every job has its outcome now: let the answers go out, then close
                    self._http.stop(grace=max(1.0, self._stop_began + budget - time.monotonic()) if drain else 1.0)
            finally:
                self._replies.wake()  # the loop exits now, not at its next tick

    def _load(self) -> Config:
        config = config_mod.load(self.config_path)
        if self._page is None:
            return config
        try:
            return dataclasses.replace(config, http=with_page_listener(config.http, self._page))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def reload(self, sup: Supervisor) -> dict[str, Any]:
        """Read the file again and swap it in (SIGHUP, ``gpuvisor reload``,
        the HTTP door's admin route: one at a time), or keep the running
        configuration when the file has a mistake. Returns what changed, and
        what waits for a restart (``supervisor.service.reloading``)."""
        with self._reloading:
            self.notifier.reloading()
            try:
                new = self._load()
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
            if kept is None and self._http is None and _touches_http(report["settings"]):
                kept = "[http] applies when the daemon restarts: no HTTP listener runs now"
            if kept is not None:
                report["notes"].append(kept)
            _log_reload(new.source, report)
            return report


def _touches_http(settings: list[str]) -> bool:
    """Whether a reload changed a setting of ``[http]``."""
    return any(name.split(".")[0] == "http" for name in settings)


def _log_reload(source: str, report: dict[str, Any]) -> None:
    notes = "".join(f"; {note}" for note in report["notes"])
    log.info(
        "reload from %s: modes added %s, removed %s, changed %s; settings changed %s%s",
        source,
        report["added"],
        report["removed"],
        report["changed"],
        report["settings"],
        notes,
    )
