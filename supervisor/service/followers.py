"""The daemon's ``events`` requests: each follower gets the supervisor's
events as chunks of its request until it cancels it, is cut off or goes; a
reply ends it. A follower that does not read loses its oldest events in its
own bounded queue (and is told), and flow control cuts it off as any other
client (``supervisor.service.flow``)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from protocol.client import encode_chunk
from supervisor.api import Supervisor
from supervisor.events import DEFAULT_BUFFER, EventStream
from supervisor.service.flow import FlowControl, Peer, Route
from supervisor.service.replies import Replies

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
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))


class Followers:
    """The ``events`` requests being served, keyed by client and request id."""

    def __init__(self, flow: FlowControl, replies: Replies):
        self._flow = flow
        self._replies = replies
        self._following: dict[tuple[Route, Any], _Following] = {}

    def __len__(self) -> int:
        return len(self._following)

    def follow(self, sup: Supervisor, peer: Peer, request_id: Any, buffer: int | None) -> None:
        """An ``events`` request: the supervisor's events, as chunks, until
        the client cancels it (or is cut off, or goes); a reply ends it."""
        stream = sup.events(buffer=DEFAULT_BUFFER if buffer is None else buffer)
        stream.subscription.wake = self._replies.wake
        self._replies.wake()  # for what came before the wake was in place
        future: Future = Future()
        future.add_done_callback(lambda _: stream.close())
        peer.jobs[request_id] = future  # a CANCEL finds it there, and a cut-off cancels it
        self._following[(peer.route, request_id)] = _Following(peer.route, request_id, stream, future)
        self._replies.when_done(peer.route, request_id, future)

    def pump(self) -> None:
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

    def due(self) -> bool:
        """A follower has events waiting and room for them now."""
        peers = self._flow.peers
        for following in self._following.values():
            peer = peers.get(following.route)
            if following.stream.subscription.pending and (peer is None or len(peer.backlog) < EVENTS_AHEAD):
                return True
        return False
