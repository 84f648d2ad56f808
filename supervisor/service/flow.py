"""Flow control on the daemon's front socket: a client that reads gets every
reply and every chunk, in order; a client that does not read is slowed, and
past a bound cut off, without costing the daemon or other clients anything.

::

    request ──▶ admit? ──yes──▶ the daemon handles it
                  │no (its backlog is over HOLD_AT, or requests already wait)
                  └──▶ held, in order; handled once its backlog drains
    reply / chunk ──▶ its client's backlog (in order) ──▶ send, NOBLOCK
                                               EAGAIN: kept, tried again next turn

Why a backlog per client and not libzmq's own queue: the front ROUTER has
``ROUTER_MANDATORY``, so a send to a client whose pipe is full says EAGAIN
instead of dropping the message or blocking the loop (signals included).
What does not fit stays here, per client and in order, and is tried again
every turn while it is not empty. An unbounded high-water mark
(``SNDHWM=0``) would keep every reply too, but for a client that never reads
it keeps them forever: its memory grows with every request that client sends
(docs/performance.md has the measurement). Here a client whose backlog is
over ``HOLD_AT`` has its new requests held, not handled, so it cannot grow
its backlog by asking for more; it is cut off when nothing could be sent to
it for ``STALL_S`` seconds, or when more than ``MAX_HELD`` requests (or
``MAX_HELD_BYTES``) wait.

A cut-off drops the client's backlog and held requests, cancels its queued
jobs (running ones finish, their outcome dropped), logs one line with the
counts, and leaves one ``client_cut_off`` error reply with a nil id for the
client: its notice, sent when its pipe has room again, i.e. when it reads.
From then on nothing more from that connection is handled: each request on
it is refused with ``client_cut_off`` under its id (dropped if it still does
not read), so a client never sees a reply for a request it sent before it
read the notice. A client opens a new connection to go on.
"""

from __future__ import annotations

import collections
import errno
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from protocol import ClientCutOff
from protocol.arrays import nbytes
from protocol.client import encode_reply
from protocol.frames import small
from protocol.packing import peek
from supervisor.service.operators import Caller

log = logging.getLogger("gpuvisor")

Route = tuple[bytes, ...]  # a client's routing id, plus the empty delimiter a REQ client expects back

HOLD_AT = 1000
"""Messages waiting in one client's backlog (past what libzmq's pipe to it
holds) at which its new requests are held instead of handled."""
MAX_HELD = 50_000
"""Requests held for one client at which it is cut off ..."""
MAX_HELD_BYTES = 256 * 1024 * 1024
"""... or the bytes of those requests."""
STALL_S = 10.0
"""Seconds in which not one message could be sent to a client with a
backlog, after which it is cut off."""
SEND_QUANTUM = 64
"""Messages sent to one client per loop turn, so that every client with a
backlog gets its turn within each loop turn."""
RETRY_S = 0.002
"""How soon a backlog is tried again; libzmq has no per-client writability
event (a ROUTER's POLLOUT means "some client can take more")."""
NOTICE_RETRY_S = 0.1
"""How often a cut-off client's notice is tried again, once nothing else waits."""
FORGET_S = 60.0
"""A cut-off client that was told, and has sent nothing for this long, is
forgotten; a request on that connection afterwards is served again."""


@dataclass(eq=False)
class CutOff:
    reason: str
    when: float
    notice: list | None  # the notice's frames until it is sent
    refused: int = 0  # requests that arrived afterwards, not handled


@dataclass(eq=False)
class Peer:
    """One client connection, as the front socket's routing id names it."""

    route: Route
    heard: float  # when it last sent a request
    # Outgoing, in order: encoded frames, or (request id, Future or Chunk) encoded when sent.
    backlog: collections.deque = field(default_factory=collections.deque)
    blocked_since: float | None = None  # when a send to it first said EAGAIN; None while messages flow
    held: collections.deque = field(default_factory=collections.deque)  # requests' frames, in order
    held_bytes: int = 0
    jobs: dict[Any, Future] = field(default_factory=dict)  # request id -> its submit's Future
    cut_off: CutOff | None = None
    caller: Caller | None = None  # who it is, read from its first message's connection
    gone: bool = False  # a send found its connection closed: what it follows can stop

    @property
    def client(self) -> str:
        """Whose share of the queue its jobs take: its user's (other than the
        daemon's own and root) or its CURVE key's, else the connection's."""
        share = self.caller.share if self.caller is not None else None
        return share or "zmq:" + self.route[0].hex()

    @property
    def idle(self) -> bool:
        return not (self.backlog or self.held or self.jobs or self.cut_off)

    def admits(self) -> bool:
        """Whether its next request may be handled now: nothing of it is held
        (order), and its backlog is under ``HOLD_AT``."""
        return not self.held and len(self.backlog) < HOLD_AT


@dataclass
class Counts:
    """Since the daemon started."""

    dropped: int = 0  # replies and chunks for clients that were cut off or had gone
    cut_off: int = 0  # clients cut off
    refused: int = 0  # requests not handled because their client was cut off


class FlowControl:
    """The front socket's outgoing side, and the held requests. Used by the
    daemon's main thread only."""

    def __init__(self, sock: zmq.Socket, encode: Callable[[Any, Any], list], cancel: Callable[[Future], bool]):
        """``encode(request_id, Future | Chunk)`` makes the frames of a reply
        or chunk when it is sent; ``cancel(future)`` cancels a queued job."""
        self.sock = sock
        self.encode = encode
        self.cancel = cancel
        self.peers: dict[Route, Peer] = {}
        self.counts = Counts()

    # ------------------------------------------------------------ requests

    def peer(self, route: Route, now: float | None = None) -> Peer:
        peer = self.peers.get(route)
        if peer is None:
            peer = self.peers[route] = Peer(route, time.monotonic() if now is None else now)
        return peer

    def hold(self, peer: Peer, frames: list, now: float) -> None:
        """Keep a request until ``peer``'s backlog drains; past the bounds,
        cut it off."""
        peer.held.append(frames)
        peer.held_bytes += sum(nbytes(f) for f in frames)
        if len(peer.held) == 1:
            log.debug(
                "client %s reads slower than it asks: its requests wait (%d replies waiting)",
                peer.route[0].hex(),
                len(peer.backlog),
            )
        if len(peer.held) > MAX_HELD or peer.held_bytes > MAX_HELD_BYTES:
            reason = f"it sent {len(peer.held):,} requests ({peer.held_bytes:,} bytes) more than it read replies"
            self.cut(peer, reason, now)

    def refuse(self, peer: Peer, frames: list) -> None:
        """A request on a cut-off connection: not handled. Once the client has
        its notice, each such request is answered ``client_cut_off``."""
        cut = peer.cut_off
        if cut is None:
            raise RuntimeError("refuse() is for a cut-off connection")
        cut.refused += 1
        self.counts.refused += 1
        if cut.notice is None:
            error = ClientCutOff(f"this connection was cut off ({cut.reason}); open a new one")
            self._try_send(peer, encode_reply(peek(frames, "id"), error=error))

    # ------------------------------------------------------------ replies

    def post(self, route: Route, item: Any) -> None:
        """Queue a reply or chunk (frames, or (request id, Future | Chunk))."""
        peer = self.peer(route)
        if peer.cut_off is not None:
            self.counts.dropped += 1
            return
        peer.backlog.append(item)

    def flush(self, now: float) -> bool:
        """Send what each client's pipe takes, up to ``SEND_QUANTUM`` each;
        deliver pending notices; cut off clients stalled past ``STALL_S``.
        Returns whether anything was sent."""
        sent = False
        for peer in list(self.peers.values()):
            if peer.cut_off is not None:
                self._notify(peer, now)
                continue
            quantum = SEND_QUANTUM
            backlog = peer.backlog
            while backlog and quantum:
                item = backlog[0]
                frames = item if isinstance(item, list) else self.encode(*item)
                outcome = self._try_send(peer, frames)
                if outcome is None:  # gone
                    break
                if not outcome:
                    backlog[0] = frames  # encoded once
                    if peer.blocked_since is None:
                        peer.blocked_since = now
                    elif now - peer.blocked_since > STALL_S:
                        silent = now - peer.blocked_since
                        self.cut(peer, f"it read nothing for {silent:.0f}s while {len(backlog):,} replies waited", now)
                    break
                backlog.popleft()
                peer.blocked_since = None
                quantum -= 1
                sent = True
            if peer.idle:
                self.peers.pop(peer.route, None)
        return sent

    def release(self, budget: int) -> Iterator[tuple[Peer, list]]:
        """Held requests that may be handled now (their client's backlog has
        drained), in order, at most ``budget``; each is checked after the one
        before it was handled, since handling it may fill the backlog again."""
        for peer in list(self.peers.values()):
            while budget and peer.held and peer.cut_off is None and len(peer.backlog) < HOLD_AT:
                frames = peer.held.popleft()
                peer.held_bytes -= sum(nbytes(f) for f in frames)
                budget -= 1
                if not peer.held:
                    log.debug("client %s caught up: its requests are handled again", peer.route[0].hex())
                yield peer, frames

    def retry_in(self) -> float | None:
        """Seconds until the loop should come back for a backlog or a notice:
        none for a client that could take more than its quantum this turn, or
        whose held requests may go on."""
        peers = self.peers.values()
        if any((p.backlog and p.blocked_since is None) or (p.held and len(p.backlog) < HOLD_AT) for p in peers):
            return 0.0
        if any(p.backlog for p in peers):
            return RETRY_S
        if any(p.cut_off is not None and p.cut_off.notice is not None for p in self.peers.values()):
            return NOTICE_RETRY_S
        return None

    def waiting(self) -> bool:
        """Replies still waiting for a client that has not been cut off."""
        return any(p.backlog for p in self.peers.values() if p.cut_off is None)

    # ------------------------------------------------------------ cut-off

    def cut(self, peer: Peer, reason: str, now: float) -> None:
        """Stop serving ``peer``: drop what waits for it, cancel its queued
        jobs, log once, and leave it its notice."""
        dropped, unrun = len(peer.backlog), len(peer.held)
        cancelled = sum(1 for future in list(peer.jobs.values()) if self.cancel(future))
        peer.backlog.clear()
        peer.held.clear()
        peer.held_bytes = 0
        self.counts.dropped += dropped
        self.counts.refused += unrun
        self.counts.cut_off += 1
        running = len(peer.jobs) - cancelled
        message = (
            f"the daemon stopped serving this connection: {reason}. {dropped:,} replies were dropped, "
            f"{cancelled:,} queued jobs cancelled, {unrun:,} requests never run, {running:,} running jobs' "
            "outcomes will not be sent. Every request still outstanding on this connection has ended (what comes "
            "later on it is a client_cut_off refusal); open a new connection"
        )
        notice = encode_reply(None, error=ClientCutOff(message, dropped=dropped, cancelled=cancelled, unrun=unrun))
        peer.cut_off = CutOff(reason, now, notice)
        log.warning(
            "cut off client %s: %s; dropped %d replies, cancelled %d queued jobs, %d requests never run",
            peer.route[0].hex(),
            reason,
            dropped,
            cancelled,
            unrun,
        )
        self._notify(peer, now)

    def _notify(self, peer: Peer, now: float) -> None:
        cut = peer.cut_off
        if cut is None:
            raise RuntimeError("_notify() is for a cut-off connection")
        if cut.notice is not None:
            outcome = self._try_send(peer, cut.notice)
            if outcome:
                cut.notice = None
                log.info(
                    "client %s read again and was told it was cut off (%.1fs after); %d requests it sent "
                    "meanwhile were not run",
                    peer.route[0].hex(),
                    now - cut.when,
                    cut.refused,
                )
            return
        if now - peer.heard > FORGET_S and not peer.jobs:
            del self.peers[peer.route]

    # ------------------------------------------------------------ the socket

    def _try_send(self, peer: Peer, frames: list) -> bool | None:
        """True: sent; False: its pipe is full (EAGAIN); None: the client has
        gone, and is forgotten."""
        try:
            self.sock.send_multipart([*peer.route, *frames], zmq.NOBLOCK, copy=small(frames))
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
        peer.gone = True
        lost = len(peer.backlog)
        self.counts.dropped += lost
        if lost or peer.held:
            log.info(
                "client %s went away; dropped %d replies and %d requests waiting for it",
                peer.route[0].hex(),
                lost,
                len(peer.held),
            )
        peer.backlog.clear()
        peer.held.clear()
        peer.held_bytes = 0
        peer.blocked_since = None
        if peer.cut_off is not None:
            peer.cut_off.notice = None
        if not peer.jobs:
            self.peers.pop(peer.route, None)
        return None
