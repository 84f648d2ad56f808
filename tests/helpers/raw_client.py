"""A minimal client for the gpuvisor daemon, written from docs/protocol.md
(part 2) alone: standard library, ``zmq`` and ``msgpack``, nothing from the
project's own packages.

Requests are one-frame msgpack maps ``{"v": 1, "k": kind, "id": id, ...}``;
every request gets exactly one reply ``{"v": 1, "k": "reply", "id": id,
"ok": bool, "value" | "error": ...}``. Replies come in the order their outcomes
do, so ``send`` only sends (pipelining) and replies are matched by ``id``.
Every wait is bounded: a wait that runs out raises ``TimeoutError``.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import msgpack
import zmq

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024


def pack(obj: Any) -> bytes:
    """Encode as the doc asks: str as msgpack str, bytes as msgpack bin."""
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame: bytes) -> Any:
    """Decode a reply: str stays str, bin becomes bytes, maps may have
    non-string keys (payloads and results may be any msgpack value)."""
    if len(frame) > MAX_FRAME:
        raise ValueError(f"frame of {len(frame)} bytes is over the {MAX_FRAME}-byte limit")
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


class RawClient:
    """One DEALER socket connected to the daemon's ROUTER.

    ``timeout`` (seconds) bounds ``call`` and is the default for ``recv``.
    Replies read while waiting for a particular id are kept, in arrival
    order, and handed out by later ``recv``/``wait_for`` calls.
    """

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._ids = itertools.count(1)
        self._backlog: list[dict] = []
        self.closed = False

    # -- sending -----------------------------------------------------------

    def send(self, kind: str, *, id: int | str | None = None, **fields: Any) -> int | str:
        """Send request ``kind`` with ``fields``; return its id without waiting.

        ``id`` defaults to a fresh integer. ``fields`` are put after ``v``,
        ``k`` and ``id``, so a test may override ``v`` (say ``v=2``).
        """
        if id is None:
            id = next(self._ids)
        self.send_map({"v": VERSION, "k": kind, "id": id, **fields})
        return id

    def send_map(self, message: Any) -> None:
        """Send any msgpack value as the single frame (for malformed requests)."""
        self.send_raw(pack(message))

    def send_raw(self, frame: bytes) -> None:
        """Send ``frame`` as it is, as one ZeroMQ frame."""
        self._sock.send(frame, flags=zmq.NOBLOCK)

    # -- receiving ---------------------------------------------------------

    def _read(self, timeout: float) -> dict | None:
        """One reply from the socket, or None if none came within ``timeout``."""
        if not self._sock.poll(max(0, int(timeout * 1000)), zmq.POLLIN):
            return None
        frames = self._sock.recv_multipart()
        if len(frames) != 1:
            raise ValueError(f"a reply must be one frame, got {len(frames)}")
        reply = unpack(frames[0])
        if not isinstance(reply, dict) or reply.get("k") != "reply" or reply.get("v") != VERSION:
            raise ValueError(f"not a version-{VERSION} reply: {reply!r}")
        return reply

    def recv(self, timeout: float | None = None) -> dict:
        """The next reply (kept ones first); ``TimeoutError`` if none comes in time."""
        if self._backlog:
            return self._backlog.pop(0)
        wait = self.timeout if timeout is None else timeout
        reply = self._read(wait)
        if reply is None:
            raise TimeoutError(f"no reply within {wait}s")
        return reply

    def wait_for(self, id: int | str | None, timeout: float | None = None) -> dict:
        """The reply whose id is ``id`` (type included: 1 is not "1"); other
        replies read meanwhile are kept."""
        for i, reply in enumerate(self._backlog):
            if _same_id(reply.get("id"), id):
                return self._backlog.pop(i)
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            reply = self._read(deadline - time.monotonic())
            if reply is None:
                raise TimeoutError(f"no reply with id {id!r} within {wait}s")
            if _same_id(reply.get("id"), id):
                return reply
            self._backlog.append(reply)

    def call(self, kind: str, *, id: int | str | None = None, wait: float | None = None, **fields: Any) -> dict:
        """Send and wait (at most ``wait`` seconds, default ``self.timeout``)
        for the reply with that id. Named ``wait``, not ``timeout``: that is
        a ``submit`` field."""
        return self.wait_for(self.send(kind, id=id, **fields), wait)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close(linger=0)
            self._ctx.term()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_id(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def value(reply: dict) -> Any:
    """The reply's value; AssertionError naming the error if it is not ok."""
    assert reply.get("ok") is True, f"expected a successful reply, got {reply!r}"
    return reply["value"]


def error(reply: dict) -> dict:
    """The reply's error map; AssertionError if the reply is ok."""
    assert reply.get("ok") is False, f"expected an error reply, got {reply!r}"
    err = reply["error"]
    assert isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(err.get("message"), str), err
    return err
