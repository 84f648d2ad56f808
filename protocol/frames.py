"""Receiving a multipart message the cheap way for each part.

``recv_multipart(copy=False)`` wraps every part in a ``zmq.Frame``, which
costs more than copying a small part; ``copy=True`` would copy a 64 MiB
array. The routing and header parts are small: copied, as bytes. Any part
after them is an array: kept in its frame, never copied.
"""

from __future__ import annotations

from collections.abc import Iterator

import zmq

# Plain ints: pyzmq's own constants are IntFlags, and every ``&`` or ``|`` of
# them builds a new enum member in Python code, several times a message.
_EVENTS, _POLLIN, _RCVMORE, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.RCVMORE), int(zmq.NOBLOCK)


def recv_message(sock: zmq.Socket, flags: int = 0, copied: int = 1, first_frame: bool = False) -> list:
    """The next message: its first ``copied`` parts as bytes, the rest as
    ``zmq.Frame``. Raises ``zmq.Again`` like ``recv`` with NOBLOCK.
    ``first_frame``: the first part as a ``zmq.Frame`` whatever ``copied``
    says, for the properties of the connection it came on."""
    parts: list = [sock.recv(flags, copy=not first_frame)]
    while sock.getsockopt(_RCVMORE):
        parts.append(sock.recv(copy=len(parts) < copied))
    return parts


def read_all(sock: zmq.Socket, copied: int = 1) -> Iterator[list]:
    """Every message waiting on ``sock``, as ``recv_message`` gives them,
    without blocking. The socket's EVENTS say when none is left: cheaper
    than the ``zmq.Again`` a non-blocking ``recv`` raises, once a turn."""
    while int(sock.getsockopt(_EVENTS)) & _POLLIN:
        try:
            yield recv_message(sock, _NOBLOCK, copied)
        except zmq.Again:
            return


def small(frames: list) -> bool:
    """Send ``frames`` copied? Yes for one small header (cheaper than a
    ``zmq.Frame``); no when there are arrays or the header is big (a large
    ``bytes`` payload), which go without a copy."""
    return len(frames) == 1 and len(frames[0]) < zmq.COPY_THRESHOLD
