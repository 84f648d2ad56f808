"""What each client of the daemon asks, and the one reply it gets: requests
read from the front socket within a budget, decoded, checked against the
caller's rights and carried out on the thread-safe ``Supervisor``.

A request is answered at once (ping, status, a refusal) or when its Future
is done (a job, a switch), through ``supervisor.service.replies``; bad bytes
or bad arguments get an error reply and the daemon goes on. Stopping and
reloading belong to the daemon, which hands them in as calls."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from protocol import PROTOCOL_VERSION, Forbidden, GpuvisorError, ShuttingDown, UnknownMode
from protocol.client import BadRequest, ClientRequest, Request, decode_request, encode_reply
from protocol.frames import recv_message
from supervisor.api import Supervisor
from supervisor.service.connections import ConnectionCap
from supervisor.service.flow import FlowControl, Peer, Route
from supervisor.service.followers import Followers
from supervisor.service.glance import Glance
from supervisor.service.operators import Operators
from supervisor.service.replies import Replies

if TYPE_CHECKING:
    from supervisor.service.http.server import HttpFront

log = logging.getLogger("gpuvisor")

OPERATORS_ONLY = frozenset({Request.SHUTDOWN, Request.SWITCH, Request.RESTART, Request.UNLOAD, Request.RELOAD})
"""What changes the service for everyone: refused to a caller who may only run jobs."""


class Requests:
    """The clients' requests, from the front socket to the ``Supervisor``."""

    def __init__(
        self,
        sup: Supervisor,
        flow: FlowControl,
        replies: Replies,
        followers: Followers,
        operators: Operators,
        *,
        endpoint: str,
        http: HttpFront | None,
        connections: ConnectionCap | None,
        stopping: Callable[[], bool],
        stop: Callable[[bool, float | None], None],
        reload: Callable[[], dict[str, Any]],
        glance: Glance,
    ):
        self._sup = sup
        self._flow = flow
        self._replies = replies
        self._followers = followers
        self._operators = operators
        self._endpoint = endpoint
        self._http = http
        self._connections = connections
        self._stopping = stopping
        self._stop = stop
        self._reload = reload
        self._glance = glance

    def read(self, front: zmq.Socket, budget: int) -> int:
        """At most ``budget`` requests; the rest wait for the next turn.
        Returns how many were read."""
        flow = self._flow
        now = time.monotonic()
        for n in range(budget):
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
                self.serve(peer, frames)
            else:
                flow.hold(peer, frames, now)
        return budget

    def serve(self, peer: Peer, frames: list) -> None:
        """One request, decoded and carried out; a mistake in it gets an error reply."""
        try:
            request = decode_request(frames, packed_payload=True)  # a payload is forwarded as it came
        except GpuvisorError as exc:  # BadRequest, or a ProtocolError from unpacking
            log.warning("bad request from client %s: %s", peer.route[0].hex(), exc.message)
            self._reply_now(peer, getattr(exc, "request_id", None), error=exc)
            return
        try:
            self._carry_out(peer, request)
        except (GpuvisorError, TypeError, ValueError) as exc:  # raised by the API at once (bad arguments, Forbidden)
            error = exc if isinstance(exc, GpuvisorError) else BadRequest(str(exc), request.id)
            self._reply_now(peer, request.id, error=error)

    def _carry_out(self, peer: Peer, request: ClientRequest) -> None:
        sup = self._sup
        kind, args = request.kind, request.args
        if kind is Request.PING:
            pong = {"pong": True, "pid": os.getpid(), "version": PROTOCOL_VERSION}
            self._reply_now(peer, request.id, value=pong)
        elif kind is Request.STATUS:
            self._reply_now(peer, request.id, value=self._status())
        elif kind is Request.MODES:
            self._reply_now(peer, request.id, value=sup.modes())
        elif kind is Request.METRICS:
            self._reply_now(peer, request.id, value=sup.metrics())
        elif kind is Request.GLANCE:  # status and the last minutes: what the status page draws
            picture = self._glance.picture(self._status())
            self._reply_now(peer, request.id, value={**picture, "operator": _is_operator(peer)})
        elif kind is Request.EVENTS:  # anyone who may run jobs: the events tell what status() tells, as it happens
            self._followers.follow(sup, peer, request.id, args["buffer"])
        elif kind is Request.CANCEL:  # a queued job never runs; a stream that runs is stopped at its next chunk
            future = peer.jobs.get(args["target"])
            self._reply_now(peer, request.id, value={"cancelled": bool(future is not None and future.cancel())})
        elif kind in OPERATORS_ONLY and not _is_operator(peer):
            who = peer.caller.who if peer.caller is not None else "an unknown caller"
            log.warning("refused %s from %s: not an operator", kind.value, who)
            raise Forbidden(
                f"{kind.value} is for operators: the daemon's own user, root, a member of [daemon] "
                "admin_group or an admin CURVE key; this caller may only run jobs"
            )
        elif kind is Request.SHUTDOWN:
            how = "drain" if args["drain"] else "no drain"
            log.info("%s asked to stop (%s)", peer.caller.who if peer.caller else "?", how)
            self._reply_now(peer, request.id, value={"stopping": True, "drain": args["drain"]})
            self._stop(args["drain"], args["timeout"])
        elif self._stopping():
            self._reply_now(peer, request.id, error=ShuttingDown("the daemon is shutting down"))
        elif kind is Request.SUBMIT:
            self._submit(peer, request)
        elif kind is Request.SWITCH:
            self._replies.when_done(peer.route, request.id, sup.switch_mode(args["mode"], device=args["device"]))
        elif kind is Request.RESTART:
            if args["mode"] is not None and sup.config.mode(args["mode"]) is None:
                raise UnknownMode(f"unknown mode {args['mode']!r}")
            self._replies.when_done(peer.route, request.id, sup.restart(args["mode"], device=args["device"]))
        elif kind is Request.UNLOAD:
            self._replies.when_done(peer.route, request.id, sup.unload(args["device"]))
        elif kind is Request.RELOAD:
            self._reply_now(peer, request.id, value=self._reload())

    def _submit(self, peer: Peer, request: ClientRequest) -> None:
        args = request.args
        on_chunk = self._replies.chunk_sink(peer.route, request.id) if args["stream"] else None
        future = self._sup.submit_for(
            peer.client,
            args["task"],
            args["payload"],
            mode=args["mode"],
            retries=args["retries"],
            on_chunk=on_chunk,
            give_up_after=self._patience(args["timeout"]),
            packed=True,
        )
        peer.jobs[request.id] = future
        self._replies.when_done(peer.route, request.id, future)

    def _patience(self, timeout: float | None) -> float | None:
        """What a client's ``timeout`` may do. Only the operator's
        ``job_timeout`` stops a worker, and it is a ceiling: a client may
        not ask for more, nor for none (``0``). A client that asks for less
        gives up on its job then (``JobTimeout``), and the worker finishes
        it: a client's short timeout must not cost everyone a worker, a
        reload and the mode's budget."""
        limit = self._sup.config.job_timeout
        if not timeout or (limit and timeout >= limit):
            return None
        return timeout

    def _status(self) -> dict[str, Any]:
        """The supervisor's status, and the daemon's own beside it."""
        sup = self._sup
        return {
            **sup.status(),
            "daemon_pid": os.getpid(),
            "endpoint": self._endpoint,
            "http": self._http.listening if self._http is not None else [],
            "modes": sorted(sup.config.modes),
            "clients": self._clients_status(),
        }

    def _clients_status(self) -> dict[str, int]:
        flow = self._flow
        peers = flow.peers.values()
        connections = self._connections
        return {
            "connected": sum(1 for p in peers if p.cut_off is None),
            "waiting_replies": sum(len(p.backlog) for p in peers),
            "held_requests": sum(len(p.held) for p in peers),
            "cut_off": flow.counts.cut_off,
            "dropped": flow.counts.dropped,
            "refused": flow.counts.refused,
            "open_connections": connections.open if connections is not None else 0,
            "refused_connections": connections.refused if connections is not None else 0,
            "following_events": len(self._followers),
        }

    def _reply_now(self, peer: Peer, request_id: Any, *, value: Any = None, error: GpuvisorError | None = None) -> None:
        self._flow.post(peer.route, encode_reply(request_id, value=value, error=error))


def _is_operator(peer: Peer) -> bool:
    return peer.caller is not None and peer.caller.operator
