"""One HTTP connection, held to the door's limits: uvicorn's h11 protocol
(chosen by name, never ``httptools`` because it happens to be installed),
with caps on connections, on a request head's size and on the time it may
take to arrive, and on the time an answer may wait for its reader.

::

    connection_made ── over a cap? ── close it at once
          │
          ▼
    head timer armed ──(a whole head arrives)──▶ disarmed while the request runs
          ▲                                              │
          └──────────── re-armed when its response ends ◀┘
    the timer fires: the connection is closed

The caps, counted in ``Census``: ``max_connections`` in all; on a unix
socket, each peer's uid (known from ``SO_PEERCRED`` before a byte is read)
at most ``max_connections_per_user``, but for the daemon's own uid and
root, who can stop the daemon anyway; on TCP, where nobody is known before
the head, all but an eighth of ``max_connections`` when a unix socket
listens too, so a flood on loopback TCP cannot shut the unix socket out.

uvicorn's own keep-alive timer is cancelled by any byte, so a client that
sends its head one byte every few seconds (slowloris) would hold a
connection, and its buffer, for ever; this timer is not: a head must be
whole within ``header_timeout`` of the connection opening or of the last
response. A head over ``max_header_bytes`` is answered 431 and closed,
however it arrives: h11 bounds only a head still incomplete, so one that
came whole in a single read, of any size, would be parsed (``BoundedH11``
looks for its end in what is buffered first). The body's own deadline
(``body_timeout``, a 408) is kept by the admission middleware, which reads
it.

uvicorn warns of every request h11 cannot read ("Invalid HTTP request
received.") and of every upgrade it does not serve; ``QUIET`` lets one such
line through every ten seconds, with the count of those it held back, as
this module's own warnings are.

An answer is written into the transport's buffer, which holds what the
kernel would not take yet: a client that reads nothing would keep it there,
and the connection open, for ever (12 such held 122 MB). uvicorn only stops
writing more (``pause_writing``); here a watch starts then, and when an
answer ends with bytes still buffered, and every ``send_timeout`` it looks
whether the client took any: none taken, the connection is aborted (what
was left of the answer is dropped, and a job still running for it is given
up, as for a client that left). A client that reads slowly but steadily is
never cut, however long its answer takes, as nginx's ``send_timeout``.

Limits are read from the door when a connection opens, so a reload applies
to the connections that open after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import socket
import struct
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from supervisor.service.http.admission import Door
from supervisor.service.http.clients import CONNECTION_KEY, PEER_KEY
from supervisor.service.http.errors import body

log = logging.getLogger("gpuvisor")

_WARN_EVERY_S = 10.0  # at most one line of each kind of warning a client can cause, this often
_BLANK_LINE = re.compile(b"\n\r?\n")  # the end of a head, as h11 finds it


class Throttled:
    """A warning clients can cause as often as they like, logged at most
    once every ``_WARN_EVERY_S`` seconds; the next line says how many were
    held back."""

    def __init__(self) -> None:
        self.last = -_WARN_EVERY_S
        self.held = 0

    def allow(self) -> str | None:
        """None to hold this one back, else what to add to its line ("" or the count)."""
        now = time.monotonic()
        if now - self.last < _WARN_EVERY_S:
            self.held += 1
            return None
        held, self.last, self.held = self.held, now, 0
        return f" ({held} more like it in the last {_WARN_EVERY_S:g} s were not logged)" if held else ""

    def warn(self, message: str, *args: Any) -> None:
        more = self.allow()
        if more is not None:
            log.warning(message + "%s", *args, more)


class QuietWarnings(logging.Filter):
    """uvicorn's warnings (``uvicorn.error``), each text ``Throttled``."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, Throttled] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not isinstance(record.msg, str):
            return True
        kind = self.kinds.setdefault(record.msg, Throttled()) if len(self.kinds) < 64 else Throttled()
        more = kind.allow()
        if more:
            record.msg += more.replace("%", "%%")
        return more is not None


QUIET = QuietWarnings()
_REFUSED: defaultdict[str, Throttled] = defaultdict(Throttled)  # by the cap that refused
_UNREAD = Throttled()
_EXEMPT = frozenset({0, os.getuid()})  # root and the daemon's own uid: not held to max_connections_per_user
_UNKNOWN = -1  # the uid of a unix peer whose credentials could not be read: held to the cap like anyone


@dataclass
class Census:
    """A door's open connections, as its caps count them."""

    tcp: int = 0
    users: Counter[int] = field(default_factory=Counter)  # unix socket peers, by uid


def peer_credentials(sock: Any) -> tuple[int, int]:
    """The uid and gid of the process at the other end of the unix socket
    ``sock`` (``_UNKNOWN`` each, where they cannot be read)."""
    try:
        ucred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, gid = struct.unpack("3i", ucred)
    except (OSError, AttributeError):  # AttributeError: no SO_PEERCRED on this system
        return _UNKNOWN, _UNKNOWN
    return int(uid), int(gid)


class BoundedH11(h11.Connection):
    """h11's server side, with a request's whole head (its line, headers and
    the blank line after them) held to ``max_head`` bytes however it
    arrives: once more than that is buffered, the head must have ended
    within it."""

    def __init__(self, max_head: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head)
        self.max_head = max_head
        self.head_too_large = False
        self.written = 0  # bytes of answers made so far, for the send watch

    def send_with_data_passthrough(self, event: h11.Event) -> list[bytes] | None:
        data = super().send_with_data_passthrough(event)
        self.written += sum(len(part) for part in data or ())
        return data

    def next_event(self) -> Any:
        if self.their_state is h11.IDLE and not self.head_too_large:
            buffered, _ = self.trailing_data  # only ever more than max_head once per request: then it is decided
            if len(buffered) > self.max_head and _BLANK_LINE.search(buffered, 0, self.max_head) is None:
                self.head_too_large = True
        if self.head_too_large:  # (h11's own bound on a head cut short can no longer be the first to see it)
            raise h11.RemoteProtocolError("the request's head is over max_header_bytes", error_status_hint=431)
        return super().next_event()


class DoorProtocol(H11Protocol):
    """Made by uvicorn, one per connection; ``for_door`` binds it to a door."""

    door: ClassVar[Door]
    numbers: ClassVar[itertools.count]
    census: ClassVar[Census]

    @classmethod
    def for_door(cls, door: Door) -> type[DoorProtocol]:
        return type("DoorProtocol", (cls,), {"door": door, "numbers": itertools.count(1), "census": Census()})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limits = self.door.settings
        self.conn: BoundedH11 = BoundedH11(limits.max_header_bytes)
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]  # a float does for call_later
        self.header_timeout = limits.header_timeout
        self.max_header_bytes = limits.max_header_bytes
        self.send_timeout = limits.send_timeout
        self.head_timer: asyncio.TimerHandle | None = None
        self.send_timer: asyncio.TimerHandle | None = None
        self.taken = 0  # bytes of answers the kernel had taken at the send watch's last look
        self.refused = False
        self.counted: int | str | None = None  # "tcp", or the unix peer's uid, once counted in the census
        self.number = next(self.numbers)
        self.peer: tuple[int, int] | None = None  # a unix socket peer's (uid, gid)
        app = self.app

        async def numbered(scope: Any, receive: Any, send: Any) -> None:
            scope[CONNECTION_KEY] = self.number
            if self.peer is not None:
                scope[PEER_KEY] = self.peer
            await app(scope, receive, send)

        self.app = numbered

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        refused = self._count_in(transport)
        if refused is not None:
            self.refused = True
            transport.close()
            cap, why = refused
            _REFUSED[cap].warn("HTTP: %s: closing new ones at once", why)
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._count_out()
        self._disarm()
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_sending()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._serving():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.get_write_buffer_size():
            self._watch_sending()  # a close, by keep-alive or a timer, would wait for these bytes for ever
        if not self._serving():
            self._arm()  # the next head must come within header_timeout of this answer's end

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 could not read: 431 when it was
        a head over ``max_header_bytes``, else uvicorn's 400."""
        if not self.conn.head_too_large:
            super().send_400_response(msg)
            return
        message = f"the request's head is over max_header_bytes ({self.max_header_bytes})"
        content = json.dumps(body(431, message, "request_too_large")).encode()
        head = (
            f"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            f"content-length: {len(content)}\r\nconnection: close\r\n\r\n"
        )
        answer = head.encode("ascii") + content
        self.conn.written += len(answer)
        self.transport.write(answer)  # h11 is in its error state: written by hand
        self.transport.close()
        self._watch_sending()

    # ------------------------------------------------------------ the caps

    def _count_in(self, transport: asyncio.Transport) -> tuple[str, str] | None:
        """Count this connection in the census, or say which cap refuses it, and why."""
        limits, census = self.door.settings, self.census
        if len(self.connections) >= limits.max_connections:
            return "all", f"{limits.max_connections} connections are open (max_connections)"
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            if census.tcp >= limits.tcp_connections():
                return "tcp", (
                    f"TCP holds {census.tcp} connections, all it may of max_connections "
                    f"({limits.max_connections}: the rest are kept for the unix socket)"
                )
            census.tcp += 1
            self.counted = "tcp"
            return None
        self.peer = peer_credentials(sock)
        uid = self.peer[0]
        if uid not in _EXEMPT and census.users[uid] >= limits.per_user():
            return "user", f"uid {uid} holds {census.users[uid]} connections (max_connections_per_user)"
        census.users[uid] += 1
        self.counted = uid
        return None

    def _count_out(self) -> None:
        census, counted, self.counted = self.census, self.counted, None
        if counted == "tcp":
            census.tcp -= 1
        elif isinstance(counted, int):
            census.users[counted] -= 1
            if census.users[counted] <= 0:
                del census.users[counted]

    # ------------------------------------------------------------ the head timer

    def _serving(self) -> bool:
        """Whether a request's head has arrived and its response is not over."""
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.head_timer = self.loop.call_later(self.header_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_too_slow(self) -> None:
        self.head_timer = None
        if not self._serving() and not self.transport.is_closing():
            timeout = self.header_timeout
            log.debug("HTTP: no whole request within header_timeout (%s s): closing the connection", timeout)
            self.transport.close()

    # ------------------------------------------------------------ the send watch

    def _taken(self) -> int:
        """Bytes of answers the kernel has taken from this connection's buffer."""
        return self.conn.written - self.transport.get_write_buffer_size()

    def _watch_sending(self) -> None:
        if self.send_timer is None and self.transport.get_write_buffer_size():
            self.taken = self._taken()
            self.send_timer = self.loop.call_later(self.send_timeout, self._look_at_sending)

    def _look_at_sending(self) -> None:
        self.send_timer = None
        if not self.transport.get_write_buffer_size():
            return  # all of it is with the kernel: nothing held here
        if self._taken() > self.taken:
            self._watch_sending()  # read, however slowly
            return
        _UNREAD.warn(
            "HTTP: a client read none of its answer for send_timeout (%g s): closing its connection, %d bytes unsent",
            self.send_timeout,
            self.transport.get_write_buffer_size(),
        )
        self.transport.abort()
