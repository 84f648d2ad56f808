"""The socket the workers connect to: bound on a private ``ipc://`` path,
read and written only by the loop thread.

It moves and decodes messages and nothing more. A send that fails (the
worker's socket is gone) returns False: the caller records that the worker
is lost and the loop deals with it in the one phase that handles a
worker's end. A message that cannot be decoded comes back as an error with
whatever of its header could still be read, so the loop can answer the job
it was about.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

import zmq

from protocol import MAX_MESSAGE_BYTES, Kind, ProtocolError, decode_from_worker
from protocol.frames import read_all, small
from protocol.messages import peek

_ANSWERS = frozenset({Kind.RESULT.value, Kind.CHUNK.value})


@dataclass(frozen=True, slots=True)
class Received:
    identity: bytes
    message: Any = None  # a decoded FromWorker message, or None when it could not be read
    error: ProtocolError | None = None
    kind: Any = None  # when unreadable: its kind and job id, if its header still shows them
    job: Any = None


def received(identity: bytes, body: list, packed: Collection[int] = ()) -> Received:
    """One message from the worker at ``identity``, decoded (see ``WorkerLink.receive``)."""
    try:
        raw = bool(packed) and peek(body, "k") in _ANSWERS and peek(body, "job") in packed
        return Received(identity, decode_from_worker(body, packed_value=raw))
    except ProtocolError as exc:
        return Received(identity, None, exc, peek(body, "k"), peek(body, "job"))


class WorkerLink:
    def __init__(self) -> None:
        self._ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="gpuvisor-")
        try:
            sock = self._ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Memory stays bounded: libzmq drops the connection of a peer that
            # sends more. A worker treats a dropped connection as fatal (exit 4),
            # so its job still gets an outcome. A frame between the limit and
            # this is refused by decode_from_worker, which ends the worker too.
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
            self.endpoint = f"ipc://{self._dir}/worker.sock"
            sock.bind(self.endpoint)
        except BaseException:
            self.close()
            raise
        self.socket = sock

    def send(self, identity: bytes, frames: list) -> bool:
        """False when the worker cannot be reached (its socket is gone)."""
        try:
            # Arrays (memoryviews) go without a copy; small bytes frames are
            # cheaper copied than wrapped in zmq.Frame objects.
            self.socket.send_multipart([identity, *frames], copy=small(frames))
            return True
        except zmq.ZMQError:
            return False

    def receive(self, packed: Collection[int] = ()) -> Iterator[Received]:
        """Every message waiting, decoded, without blocking. ``packed``: the
        jobs whose answers are forwarded as the bytes they came as (a
        RESULT's or CHUNK's value left packed), for a door's client."""
        for frames in read_all(self.socket, copied=2):  # identity and header as bytes; arrays stay in frames
            yield received(frames[0], frames[1:], packed)

    def close(self) -> None:
        sock = getattr(self, "socket", None)
        if sock is not None:
            sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
