"""A client's replies, read off its socket: each settles the request it
names, a chunk feeds its stream, and whatever cannot be read fails the one
request it names (or is logged when it names none), so no request waits on
a message that will never come."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any

import zmq

from protocol import ClientCutOff, JobCancelled, ProtocolError, error_from_wire
from protocol.client import decode_reply
from protocol.messages import peek
from supervisor.client.remote_job import RemoteJobFuture
from supervisor.futures import settle

log = logging.getLogger("gpuvisor")


class ReplyReader:
    """What the I/O thread needs to know of a reply beyond its request:
    whether the caller asked to cancel it (a cancelled Future then, not an
    error) and whether it was a parting request (the socket lingers for it)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.cancelling: set[int] = set()  # submits this client asked the daemon to cancel
        self.parting: set[int] = set()  # requests sent as the client closes (cancels of readers that left)

    def read(self, sock: zmq.Socket, pending: dict[int, Future]) -> tuple[float, ClientCutOff | None]:
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
                    unread = (
                        "the daemon at %s could not read one of this client's requests "
                        "(%d outstanding, which one is unknown): %s"
                    )
                    log.warning(unread, self.endpoint, len(pending), error)
                continue
            future = pending.get(reply.id)
            if future is None:
                continue  # a request this client already ended (a gap, a timeout): the rest of it is ignored
            if reply.seq is not None:  # a chunk: the request stays pending until its reply
                self._chunk(reply, future, pending)
                continue
            del pending[reply.id]
            self.parting.discard(reply.id)
            asked_to_cancel = reply.id in self.cancelling
            self.cancelling.discard(reply.id)
            if reply.ok:
                settle(future, result=reply.value)
                continue
            error = error_from_wire(reply.error)
            if asked_to_cancel and isinstance(error, JobCancelled):
                Future.cancel(future)  # cancelled at this caller's word: a cancelled Future, as in-process
            else:
                settle(future, error=error)

    @staticmethod
    def _chunk(reply: Any, future: Future, pending: dict[int, Future]) -> None:
        if future.cancelled():
            return  # cancelled at its caller's word: the chunks still on their way are dropped
        if not isinstance(future, RemoteJobFuture) or future.on_chunk is None:
            del pending[reply.id]
            settle(
                future, error=ProtocolError(f"the daemon sent a chunk for request {reply.id}, which does not stream")
            )
            return
        error = future.take_chunk(reply.seq, reply.value)
        if error is not None:
            del pending[reply.id]
            settle(future, error=error)

    def _undecodable(self, frames: list, exc: ProtocolError, pending: dict[int, Future]) -> None:
        """A message that is not a valid reply: if its id can still be read,
        that request fails with the ``ProtocolError``; otherwise it is logged."""
        request_id = peek(frames, "id")
        future = pending.pop(request_id, None) if isinstance(request_id, int) else None
        if future is None:
            dropped = (
                "dropped a message from the daemon at %s that cannot be decoded and names no request of this client: %s"
            )
            log.warning(dropped, self.endpoint, exc.message)
            return
        settle(future, error=ProtocolError(f"the reply to request {request_id} cannot be decoded: {exc.message}"))
