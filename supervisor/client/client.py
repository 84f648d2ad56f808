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

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from protocol import ClientCutOff, DaemonUnavailable, ProtocolError, StreamIncomplete, error_from_wire
from protocol.client import Request, decode_reply, encode_request
from protocol.messages import peek
from supervisor.client.endpoint import default_endpoint
from supervisor.futures import settle
from supervisor.mailbox import empty_pipe
from supervisor.stream import AsyncJobStream, JobStream

_LINGER_MS = 0
log = logging.getLogger("gpuvisor")


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = 10.0,
        curve_server_key: bytes | None = None,
        curve_client_cert: str | None = None,
    ):
        """``endpoint`` defaults to the daemon's default (``ipc://`` in the
        runtime directory). ``timeout``: seconds of silence from the daemon,
        while requests wait, before it is declared unavailable. For a CURVE
        daemon give its public key and this client's secret certificate file
        (``zmq.auth``)."""
        self.endpoint = endpoint or default_endpoint()
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._outbox: collections.deque[tuple[list[bytes], int, Future | None]] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ids_of: dict[int, int] = {}  # id(Future) -> request id, for cancel()
        # Made and connected here, so a bad endpoint or certificate is the
        # caller's error now; then handed to the I/O thread, its only user.
        self._ctx = zmq.Context()
        self._curve = (curve_server_key, curve_client_cert)
        try:
            self._sock = self._connect(*self._curve)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self._ctx.term()
            os.close(self._wake_r)
            os.close(self._wake_w)
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

                public, secret = load_certificate(client_cert)
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
            sock.connect(self.endpoint)
            return sock
        except BaseException:
            sock.close(linger=0)
            raise

    # ------------------------------------------------------------ the API

    def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        stream: bool = False,
    ) -> Future | JobStream:
        """As ``Supervisor.submit``; ``stream=True`` gives a ``JobStream`` of
        the chunks the daemon relays, then the job's one outcome."""
        if not stream:
            return self._submit(None, task, payload, mode=mode, timeout=timeout, retries=retries)
        return JobStream()._feed(
            lambda sink: self._submit(sink, task, payload, mode=mode, timeout=timeout, retries=retries)
        )

    def _submit(self, on_chunk: Callable[[Any], None] | None, task: str, payload: Any = None, *,
                mode: str | None = None, timeout: float | None = None, retries: int = 0) -> Future:  # fmt: skip
        """A submit request; with ``on_chunk``, a streamed one."""
        fields = {"task": task, "payload": payload, "mode": mode, "timeout": timeout, "retries": retries}
        if on_chunk is not None:
            fields["stream"] = True
        return self._request(Request.SUBMIT, on_chunk, **fields)

    def switch_mode(self, mode: str) -> Future:
        return self._request(Request.SWITCH, mode=mode)

    def restart(self, mode: str | None = None) -> Future:
        return self._request(Request.RESTART, mode=mode)

    def status(self) -> dict[str, Any]:
        return self._request(Request.STATUS).result()

    def ping(self) -> dict[str, Any]:
        return self._request(Request.PING).result()

    def cancel(self, future: Future) -> bool:
        """Ask the daemon to cancel a submitted job; True if it was still
        queued (its Future then fails with ``JobCancelled``)."""
        target = self._ids_of.get(id(future))
        if target is None or future.done():
            return False
        return bool(self._request(Request.CANCEL, target=target).result()["cancelled"])

    def shutdown(self, drain: bool = True) -> dict[str, Any]:
        """Ask the daemon to stop (after draining its queue, by default)."""
        return self._request(Request.SHUTDOWN, drain=drain).result()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.write(self._wake_w, b"\0")
        self._thread.join(timeout=10)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _request(self, kind: Request, on_chunk: Callable[[Any], None] | None = None, **fields: Any) -> Future:
        request_id = next(self._ids)
        frames = encode_request(kind, request_id, **fields)  # TypeError here, in the caller
        future: Future = Future()
        future.on_chunk = on_chunk  # a streamed submit's chunks, called on the I/O thread
        future.chunks = 0  # chunks received: the next must carry seq chunks + 1
        with self._lock:
            if self._closed:
                raise DaemonUnavailable("this client is closed")
            self._outbox.append((frames, request_id, future))
            if kind is Request.SUBMIT:
                self._ids_of[id(future)] = request_id
                future.add_done_callback(lambda f: self._ids_of.pop(id(f), None))
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass
        return future

    def _io(self) -> None:
        pending: dict[int, Future] = {}
        try:
            self._serve(pending)
        except BaseException as exc:  # noqa: BLE001 - a dead I/O thread must not leave Futures waiting forever
            with self._lock:
                self._closed = True
                batch = list(self._outbox)
                self._outbox.clear()
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
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(min(self.timeout, 1.0) * 1000))
                if self._wake_r in events:
                    empty_pipe(self._wake_r)
                with self._lock:
                    closed, batch = self._closed, list(self._outbox)
                    self._outbox.clear()
                if closed:  # every request gets an outcome, the unsent ones too
                    gone = DaemonUnavailable("the client was closed before the daemon answered")
                    for future in [*pending.values(), *(f for _, _, f in batch)]:
                        settle(future, error=gone)
                    return
                for frames, request_id, future in batch:
                    if not pending:
                        heard = time.monotonic()  # the silence clock starts with the first request
                    pending[request_id] = future
                    try:
                        sock.send_multipart(frames)
                    except zmq.Again:
                        pending.pop(request_id)
                        settle(future, error=DaemonUnavailable(f"could not send to {self.endpoint}"))
                if monitor in events:
                    monitor.recv_multipart()
                    lost = DaemonUnavailable(
                        f"lost the connection to {self.endpoint} (the daemon stopped or restarted); "
                        "the outcome of requests in flight is unknown"
                    )
                    for future in pending.values():
                        settle(future, error=lost)
                    pending.clear()
                    ping_id = None
                if sock in events:
                    heard, cut_off = self._read_replies(sock, pending)
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
            sock.close(linger=0)
            self._ctx.term()

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
            zmq.EVENT_DISCONNECTED, addr=f"inproc://gpuvisor-client-monitor-{next(self._ids)}"
        )

    def _read_replies(self, sock: zmq.Socket, pending: dict[int, Future]) -> tuple[float, ClientCutOff | None]:
        """Everything waiting on ``sock``: (when it was read, the daemon's
        cut-off notice if one came: the caller ends every request)."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)  # arrays stay in these frames
            except zmq.Again:
                return time.monotonic(), None
            try:
                reply = decode_reply(frames)
            except ProtocolError as exc:
                self._undecodable(frames, exc, pending)
                continue
            if not isinstance(reply.id, int):
                if reply.id is None and not reply.ok:
                    error = error_from_wire(reply.error)
                    if isinstance(error, ClientCutOff):
                        log.warning("the daemon at %s cut this client off: %s", self.endpoint, error.message)
                        return time.monotonic(), error
                    log.warning("the daemon at %s could not read one of this client's requests (%d outstanding, "
                                "which one is unknown): %s", self.endpoint, len(pending), error)  # fmt: skip
                continue
            future = pending.get(reply.id)
            if future is None:
                continue  # a request this client already ended (a gap, a timeout): the rest of it is ignored
            if reply.seq is not None:  # a chunk: the request stays pending until its reply
                self._chunk(reply, future, pending)
                continue
            del pending[reply.id]
            if reply.ok:
                settle(future, result=reply.value)
            else:
                settle(future, error=error_from_wire(reply.error))

    @staticmethod
    def _chunk(reply: Any, future: Future, pending: dict[int, Future]) -> None:
        sink = getattr(future, "on_chunk", None)
        expected = getattr(future, "chunks", 0) + 1
        if sink is None:
            del pending[reply.id]
            settle(
                future, error=ProtocolError(f"the daemon sent a chunk for request {reply.id}, which does not stream")
            )
            return
        if reply.seq != expected:
            del pending[reply.id]
            lost = f"{reply.seq - expected:,} lost" if reply.seq > expected else "out of order"
            error = StreamIncomplete(f"request {reply.id}: chunk {reply.seq} came after chunk {expected - 1} "
                                     f"({lost}); the stream is incomplete")  # fmt: skip
            settle(future, error=error)
            return
        future.chunks = expected
        sink(reply.value)

    def _undecodable(self, frames: list, exc: ProtocolError, pending: dict[int, Future]) -> None:
        """A message that is not a valid reply: if its id can still be read,
        that request fails with the ``ProtocolError``; otherwise it is logged."""
        request_id = peek(frames, "id")
        future = pending.pop(request_id, None) if isinstance(request_id, int) else None
        if future is None:
            log.warning("dropped a message from the daemon at %s that cannot be decoded and names no request of "
                        "this client: %s", self.endpoint, exc.message)  # fmt: skip
            return
        settle(future, error=ProtocolError(f"the reply to request {request_id} cannot be decoded: {exc.message}"))


class AsyncClient:
    """``Client`` for asyncio: every call is awaitable."""

    def __init__(self, endpoint: str | None = None, **kwargs: Any):
        self._sync = Client(endpoint, **kwargs)

    async def submit(self, task: str, payload: Any = None, *, stream: bool = False, **kwargs: Any) -> Any:
        """The result; with ``stream=True`` an ``AsyncJobStream``."""
        if not stream:
            return await asyncio.wrap_future(self._sync.submit(task, payload, **kwargs))
        job_stream = AsyncJobStream(asyncio.get_running_loop())
        return job_stream._feed(lambda sink: self._sync._submit(sink, task, payload, **kwargs))

    async def switch_mode(self, mode: str) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync.switch_mode(mode))

    async def restart(self, mode: str | None = None) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync.restart(mode))

    async def status(self) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync._request(Request.STATUS))

    async def ping(self) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync._request(Request.PING))

    async def shutdown(self, drain: bool = True) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync._request(Request.SHUTDOWN, drain=drain))

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
