"""How many connections the daemon's ZeroMQ socket keeps, in all and per
user. libzmq has no limit of its own: every connection costs a file
descriptor and some buffers, and when the process runs out of descriptors
libzmq's ipc listener aborts the whole daemon (an assertion on ``EMFILE``).
A member of ``socket_group`` who opened a few thousand connections stopped
the service for everyone.

libzmq tells about each connection it accepts (a socket monitor's
``ACCEPTED`` event, with its file descriptor). A connection past a bound is
shut down there (``shutdown()`` on a duplicate of the descriptor: libzmq
sees the peer go and closes it itself, so no descriptor is closed behind its
back). On a unix socket the kernel names the peer's user (``SO_PEERCRED``):
each user other than the daemon's own and root holds at most
``max_connections_per_user``; on TCP every connection counts against
``max_connections`` alone. A client that is shut down reconnects (a DEALER
does, every 100 ms): each try costs the daemon a few microseconds.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import socket
import struct
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("gpuvisor")

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_WARN_EVERY_S = 10.0
RESERVE_FDS = 256
"""Descriptors kept for everything but ZeroMQ connections: workers' pipes
and pidfds, the HTTP door's own cap, log files, libzmq's own."""


def raise_fd_limit() -> int:
    """The soft limit on open files raised to the hard one (a systemd unit's
    ``LimitNOFILE=`` sets both): the ceiling a flood of connections must
    reach. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class ConnectionCap:
    def __init__(self, front: zmq.Socket, max_total: int, max_per_user: int, reserved: int = 0):
        """``reserved``: descriptors other doors may hold (the HTTP door's
        cap), kept out of what ZeroMQ connections may take."""
        soft = raise_fd_limit()
        self.max_total = max(16, min(max_total, soft - RESERVE_FDS - reserved))
        self.max_per_user = max_per_user
        self.monitor = front.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._users: dict[int, int | None] = {}  # fd -> the peer's uid (None: TCP)
        self._per_user: collections.Counter[int] = collections.Counter()
        self.refused = 0
        self._warned = 0.0

    @property
    def open(self) -> int:
        return len(self._users)

    def handle(self) -> None:
        """Every event waiting on the monitor socket, in order."""
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._accepted(fd)
            else:  # DISCONNECTED, CLOSED: the descriptor is libzmq's no more
                uid = self._users.pop(fd, None)
                if uid is not None:
                    self._per_user[uid] -= 1
                    if self._per_user[uid] <= 0:
                        del self._per_user[uid]

    def _accepted(self, fd: int) -> None:
        uid = _peer_uid(fd)
        operator = uid is not None and uid in (0, os.getuid())
        over = len(self._users) >= self.max_total or (
            uid is not None and not operator and self._per_user[uid] >= self.max_per_user
        )
        if over:
            self._shut_down(fd, uid)
            return
        self._users[fd] = uid
        if uid is not None:
            self._per_user[uid] += 1

    def _shut_down(self, fd: int, uid: int | None) -> None:
        self.refused += 1
        try:
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # gone already
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY_S:
            self._warned = now
            who = f"uid {uid}" if uid is not None else "a TCP peer"
            log.warning(
                "ZeroMQ: closed a connection of %s past max_connections_per_user (%d) or max_connections "
                "(%d); %d refused so far",
                who,
                self.max_per_user,
                self.max_total,
                self.refused,
            )

    def close(self) -> None:
        self.monitor.close(linger=0)


def _peer_uid(fd: int) -> int | None:
    """The uid of a unix socket's peer; None for another kind of socket."""
    try:
        with socket.socket(fileno=os.dup(fd)) as dup:
            if dup.family != socket.AF_UNIX:
                return None
            _, uid, _ = _CRED.unpack(dup.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            return uid
    except OSError:
        return None
