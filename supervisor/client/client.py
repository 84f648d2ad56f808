"""Talk to a running ``gpuvisor serve`` from another process.

``Client`` has the methods of ``Supervisor`` (``submit`` returns a
``concurrent.futures.Future``) and is thread-safe; ``AsyncClient`` is the
same for asyncio. Neither imports torch: a client is as light as pyzmq.

One I/O thread owns the DEALER socket (ZeroMQ sockets are not thread-safe);
callers post requests to it and get Futures that its replies complete.
Liveness is separate from job length: a job may run for an hour, so a
request has no timeout of its own; instead, whenever requests are
outstanding and the daemon has said nothing for ``timeout`` seconds, the
client pings it, and if the ping goes unanswered for ``timeout`` more, every
outstanding request fails with ``DaemonUnavailable``.

No request waits on a message that will never come: a streamed job whose
chunks skip a ``seq`` fails with ``StreamIncomplete``; a reply that cannot be
decoded but names its request fails that request with ``ProtocolError``; a
``client_cut_off`` notice (the daemon stopped serving this connection
because it was not read) fails every outstanding request with
``ClientCutOff``, and the client goes on over a new connection.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import DaemonUnavailable
from protocol.client import Request, encode_request
from supervisor.arguments import check_device, check_mode, check_seconds
from supervisor.client.endpoint import client_default_endpoint, unreachable
from supervisor.client.reading import ReplyReader
from supervisor.client.remote_job import RemoteJobFuture
from supervisor.events import DEFAULT_BUFFER, EventStream, Subscription
from supervisor.futures import JobFuture, settle
from supervisor.mailbox import Mailbox
from supervisor.status import Status, SwitchResult
from supervisor.surface import ChunkSink, SupervisorAPI

_LINGER_MS = 0
log = logging.getLogger("gpuvisor")


class Client(SupervisorAPI):
    """The sync face of ``supervisor.surface`` through a daemon; thread-safe."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 10.0,
        curve_server_key: bytes | None = None,
        curve_client_cert: str | None = None,
    ):
        """``endpoint`` defaults to the daemon's default (``ipc://`` in the
        runtime directory, which must be this user's alone, or
        ``UnsafeRuntimeDir``). ``timeout``: seconds of silence from the daemon,
        while requests wait, before it is declared unavailable. For a CURVE
        daemon give its public key and this client's secret certificate file
        (``zmq.auth``)."""
        self.endpoint = endpoint or client_default_endpoint()
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._outbox: Mailbox[tuple[list, int, Future]] = Mailbox()  # requests for the I/O thread to send
        self._closing = False
        self._replies = ReplyReader(self.endpoint)  # which requests were cancelled or parting
        self._lost = threading.Event()  # set by the I/O thread while the connection is down
        # Made and connected here, so a bad endpoint or certificate is the
        # caller's error now; then handed to the I/O thread, its only user.
        self._ctx = zmq.Context()
        self._curve = (curve_server_key, curve_client_cert)
        try:
            self._sock = self._connect(*self._curve)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self._ctx.term()
            self._outbox.close()
            raise DaemonUnavailable(f"cannot connect to {self.endpoint}: {exc}") from None
        self._thread = threading.Thread(target=self._io, name="gpuvisor-client", daemon=True)
        self._thread.start()

    def _connect(self, server_key: bytes | None, client_cert: str | None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, _LINGER_MS)
            sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))
            if server_key is not None:
                from zmq.auth import load_certificate

                if client_cert is None:
                    raise ValueError("a CURVE daemon's key needs this client's certificate (curve_client_cert)")
                public, secret = load_certificate(client_cert)
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
            sock.connect(self.endpoint)
            return sock
        except BaseException:
            sock.close(linger=0)
            raise

    # ------------------------------------------------------------ the API

    def _queue_job(
        self,
        task: str,
        payload: Any,
        mode: str | None,
        timeout: float | None,
        retries: int,
        on_chunk: ChunkSink | None,
    ) -> JobFuture:
        """A submit request, through the daemon; with ``on_chunk``, a
        streamed one, whose chunks come on this client's I/O thread. The
        Future's ``cancel()`` asks the daemon and tells the truth: True only
        if the job will never run."""
        fields = {"task": task, "payload": payload, "mode": mode, "timeout": timeout, "retries": retries}
        if on_chunk is not None:
            fields["stream"] = True
        future = RemoteJobFuture(self._cancel, on_chunk)
        self._request(Request.SUBMIT, future, **fields)
        return future

    def switch_mode(self, mode: str, *, device: str | None = None) -> Future[SwitchResult]:
        check_mode(mode, optional=False)
        check_device(device)
        return self._request(Request.SWITCH, Future(), **_with_device({"mode": mode}, device))

    def restart(self, mode: str | None = None, *, device: str | None = None) -> Future[SwitchResult]:
        check_mode(mode, optional=True)
        check_device(device)
        return self._request(Request.RESTART, Future(), **_with_device({"mode": mode}, device))

    def unload(self, device: str | None = None) -> Future[dict[str, Any]]:
        check_device(device)
        return self._request(Request.UNLOAD, Future(), device=device)

    def reload(self) -> dict[str, Any]:
        """Ask the daemon to read its configuration file again (as SIGHUP
        does). The answer says what changed and what waits for a restart,
        or why the file was refused (``reloaded`` false, ``error``)."""
        return self._request(Request.RELOAD, Future()).result()

    def status(self) -> Status:
        """The daemon's status: the supervisor's ``Status`` plus ``daemon_pid``,
        ``endpoint``, ``modes`` (their names) and ``clients``."""
        return self._request(Request.STATUS, Future()).result()

    def modes(self) -> dict[str, dict[str, Any]]:
        return self._request(Request.MODES, Future()).result()

    def metrics(self) -> str:
        """The daemon's metrics, in the Prometheus text format."""
        return self._request(Request.METRICS, Future()).result()

    def ping(self) -> dict[str, Any]:
        return self._request(Request.PING, Future()).result()

    def glance(self) -> dict[str, Any]:
        """What the status page draws: the status, the last switches with
        their phases, each worker's memory over the last minutes, the last
        errors, and whether this caller is an operator (docs/protocol.md)."""
        return self._request(Request.GLANCE, Future()).result()

    def events(self, *, buffer: int = DEFAULT_BUFFER) -> EventStream:
        """The daemon's events as they happen (``with client.events() as
        events: for event in events``), until the stream is closed or the
        daemon stops; an error that ends it (the daemon went away) is raised
        by the iteration. ``buffer`` bounds the events kept for a reader
        that falls behind, on the daemon and here: the oldest go, and a
        ``dropped`` event says how many."""
        sub = Subscription(buffer)
        future = RemoteJobFuture(self._cancel, sub.put)  # its chunks are the events, put on the I/O thread
        future.add_done_callback(lambda _: sub.close())
        self._request(Request.EVENTS, future, buffer=buffer)
        return EventStream(sub, future.give_up, ended=future)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the daemon, after running what is queued (``drain``, bounded by
        ``timeout`` and by its ``[daemon] drain_timeout``); returns once it
        has stopped: its connection is gone, or it stopped answering."""
        timeout = check_seconds("timeout", timeout)
        self._request(Request.SHUTDOWN, Future(), drain=drain, timeout=timeout).result()
        next_ping = time.monotonic() + self.timeout
        while not self._lost.wait(0.05):
            if time.monotonic() >= next_ping:  # still draining, or gone without a word?
                try:
                    self.ping()
                except DaemonUnavailable:
                    return
                next_ping = time.monotonic() + self.timeout

    def close(self) -> None:
        if self._outbox.closed:
            return
        self._outbox.wake()
        self._closing = True
        self._thread.join(timeout=10)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _request(self, kind: Request, future: Future, parting: bool = False, **fields: Any) -> Future:
        """``parting``: a request nobody waits for that must still reach the
        daemon if the client closes right after (a reader that left)."""
        request_id = next(self._ids)
        frames = encode_request(kind, request_id, **fields)  # TypeError here, in the caller
        if isinstance(future, RemoteJobFuture):
            future.request_id = request_id
        if parting:
            self._replies.parting.add(request_id)
        if self._closing or not self._outbox.put((frames, request_id, future)):
            raise DaemonUnavailable("this client is closed")
        return future

    def _cancel(self, future: RemoteJobFuture, wait: bool = True) -> bool:
        """Ask the daemon to cancel ``future``'s job (a queued one, or a
        stream that runs); with ``wait``, True once it has. Without, the
        Future is cancelled when the daemon's yes comes."""
        if wait and threading.current_thread() is self._thread:
            raise RuntimeError("cancel() from a Future callback of this client would wait on itself; use give_up()")
        request_id = future.request_id
        self._replies.cancelling.add(request_id)
        try:
            answer = self._request(Request.CANCEL, Future(), parting=not wait, target=request_id)
        except DaemonUnavailable:  # closed: its requests have all ended
            return False

        def answered(answer: Future) -> bool:
            cancelled = answer.exception() is None and bool(answer.result()["cancelled"])
            if not cancelled:
                self._replies.cancelling.discard(
                    request_id
                )  # an error reply it gets later is its own, not this cancel's
            return cancelled and (Future.cancel(future) or future.cancelled())

        if not wait:
            answer.add_done_callback(answered)
            return False
        try:
            answer.result()
        except DaemonUnavailable:
            pass
        return answered(answer)

    def _io(self) -> None:
        pending: dict[int, Future] = {}
        try:
            self._serve(pending)
        except BaseException as exc:  # noqa: BLE001 - a dead I/O thread must not leave Futures waiting forever
            batch = self._outbox.close()
            error = DaemonUnavailable(f"the client's I/O failed: {type(exc).__name__}: {exc}")
            for future in [*pending.values(), *(f for _, _, f in batch)]:
                settle(future, error=error)

    def _serve(self, pending: dict[int, Future]) -> None:
        # A lost connection (the daemon died, or restarted on the same path)
        # loses the replies to what was sent: fail those requests now, rather
        # than let a new daemon's pongs keep them waiting forever.
        sock, monitor = self._sock, self._monitor(self._sock)
        heard = time.monotonic()
        ping_id: int | None = None
        connected = False  # the connection is known to be up (a monitor event, or a probe that got through)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._outbox.fd, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(math.ceil(min(self.timeout, 1.0) * 1000)))
                batch = self._outbox.take_all() if self._outbox.fd in events else []
                if self._closing:  # every request gets an outcome, the unsent ones too
                    unsent = [*batch, *self._outbox.close()]
                    self._part(
                        sock, [frames for frames, request_id, _ in unsent if request_id in self._replies.parting]
                    )
                    gone = DaemonUnavailable("the client was closed before the daemon answered")
                    for future in [*pending.values(), *(f for _, _, f in unsent)]:
                        settle(future, error=gone)
                    return
                if batch and not connected:
                    # Nothing serves the endpoint (no socket file, a refused
                    # connection): say so now, not after twice the timeout.
                    why = unreachable(self.endpoint, min(self.timeout, 2.0))
                    if why is not None:
                        error = DaemonUnavailable(f"no daemon at {self.endpoint}: {why}; is `gpuvisor serve` running?")
                        for _, _, future in batch:
                            settle(future, error=error)
                        batch = []
                    connected = why is None
                for frames, request_id, future in batch:
                    if not pending:
                        heard = time.monotonic()  # the silence clock starts with the first request
                    pending[request_id] = future
                    try:
                        sock.send_multipart(frames)
                    except zmq.Again:
                        pending.pop(request_id)
                        settle(future, error=DaemonUnavailable(f"could not send to {self.endpoint}"))
                if monitor in events and recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED:
                    connected = True
                    self._lost.clear()
                elif monitor in events:
                    connected = False
                    self._lost.set()
                    lost = DaemonUnavailable(
                        f"lost the connection to {self.endpoint} (the daemon stopped or restarted); "
                        "the outcome of requests in flight is unknown"
                    )
                    for future in pending.values():
                        settle(future, error=lost)
                    pending.clear()
                    ping_id = None
                if sock in events:
                    heard, cut_off = self._replies.read(sock, pending)
                    if cut_off is not None:  # every request sent on this connection has ended
                        for future in pending.values():
                            settle(future, error=cut_off)
                        pending.clear()
                        for old in (sock, monitor):
                            poller.unregister(old)
                        sock, monitor = self._reconnect(sock, monitor)
                        poller.register(sock, zmq.POLLIN)
                        poller.register(monitor, zmq.POLLIN)
                    if ping_id is not None and ping_id not in pending:
                        ping_id = None
                if pending and time.monotonic() - heard > self.timeout:
                    if ping_id is None or ping_id not in pending:
                        ping_id = next(self._ids)
                        pending[ping_id] = Future()
                        try:
                            sock.send_multipart(encode_request(Request.PING, ping_id))
                        except zmq.Again:
                            pass
                    if time.monotonic() - heard > 2 * self.timeout:
                        error = DaemonUnavailable(
                            f"no answer from {self.endpoint} for {2 * self.timeout:g}s: is `gpuvisor serve` running?"
                        )
                        for future in pending.values():
                            settle(future, error=error)
                        pending.clear()
                        ping_id = None
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            # Cancels of readers that left get out before the socket goes, if the daemon takes them soon.
            sock.close(linger=round(min(self.timeout, 1.0) * 1000) if self._replies.parting else 0)
            self._ctx.term()

    @staticmethod
    def _part(sock: zmq.Socket, requests: list[list]) -> None:
        """Send the parting requests still unsent as the client closes."""
        for frames in requests:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                return

    def _reconnect(self, sock: zmq.Socket, monitor: zmq.Socket) -> tuple[zmq.Socket, zmq.Socket]:
        """A new connection (a new routing id) in place of one the daemon cut off."""
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        self._sock = self._connect(*self._curve)
        return self._sock, self._monitor(self._sock)

    def _monitor(self, sock: zmq.Socket) -> zmq.Socket:
        """The socket that says when ``sock``'s connection drops. Each under a
        name of its own: a new connection's socket may reuse the old one's fd,
        which pyzmq's default name is made of."""
        return sock.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED, addr=f"inproc://gpuvisor-client-monitor-{next(self._ids)}"
        )


def _with_device(fields: dict[str, Any], device: str | None) -> dict[str, Any]:
    """``device`` goes on the wire only when named, so a daemon from before
    several devices still takes the request."""
    return {**fields, "device": device} if device is not None else fields
