"""The daemon's replies and chunks, from the core loop thread to the front
loop: a Future's done-callback or a stream's chunk sink only queues what is
finished and wakes the front loop, which alone touches the front socket.

One queue for both, so a client gets every chunk of a stream before the
reply that ends it; each item is encoded only when it is sent
(``supervisor.service.flow``)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from protocol import GpuvisorError, JobCancelled
from protocol.client import encode_chunk, encode_reply
from supervisor.mailbox import Mailbox
from supervisor.service.flow import FlowControl, Route


@dataclass(frozen=True)
class Chunk:
    """One chunk of a streamed job, numbered from 1 in the order it came."""

    seq: int
    value: Any


class Replies:
    """What the core loop finished, in the order it did: (client, request id,
    Future | chunk)."""

    def __init__(self) -> None:
        self._finished: Mailbox[tuple[Route, Any, Future | Chunk]] = Mailbox()

    @property
    def fd(self) -> int:
        """Readable when something was finished: the front loop polls it."""
        return self._finished.fd

    def wake(self) -> None:
        """Wake the front loop though nothing was finished (a follower's
        events, a stop that ended)."""
        self._finished.wake()

    def close(self) -> None:
        self._finished.close()

    def chunk_sink(self, route: Route, request_id: Any) -> Callable[[Any], None]:
        """Where a streamed job's chunks go: the same queue as the replies, so
        a client gets every chunk before the reply that ends the stream."""
        seq = itertools.count(1)

        def sink(value: Any) -> None:  # on the core loop thread: queue and wake, nothing more
            self._finished.put((route, request_id, Chunk(next(seq), value)))

        return sink

    def when_done(self, route: Route, request_id: Any, future: Future) -> None:
        """``future``'s outcome becomes the request's one reply."""

        def done(f: Future) -> None:  # runs on the core loop thread: queue and wake, nothing more
            self._finished.put((route, request_id, f))

        future.add_done_callback(done)

    def post(self, flow: FlowControl) -> None:
        """What the core loop finished goes to each client's backlog, in order;
        a finished job is no longer the client's to cancel."""
        for route, request_id, item in self._finished.take_all():
            if not isinstance(item, Chunk):
                peer = flow.peers.get(route)
                if peer is not None and peer.jobs.get(request_id) is item:
                    del peer.jobs[request_id]
            flow.post(route, (request_id, item))


def encode(request_id: Any, item: Future | Chunk) -> list:
    """A reply's or a chunk's frames, made when flow control sends it."""
    if isinstance(item, Chunk):
        return encode_chunk(request_id, item.seq, item.value)
    if item.cancelled():
        return encode_reply(request_id, error=JobCancelled("cancelled at the client's request"))
    exc = item.exception()
    if exc is not None and not isinstance(exc, GpuvisorError):
        exc = GpuvisorError(f"{type(exc).__name__}: {exc}")
    return encode_reply(request_id, value=None if exc else item.result(), error=exc)
