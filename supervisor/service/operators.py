"""Who may act as an operator on the daemon's ZeroMQ door: stop it,
switch or restart a mode. Everyone else may run jobs.

Every member of ``socket_group`` and every CURVE key could stop the daemon
(and a stop exits 0, so ``Restart=on-failure`` does not bring it back):
one careless script took the service from everyone. So the requests that
change the service for all are kept for the daemon's own user, root, the
members of ``[daemon] admin_group``, and the CURVE keys in
``[daemon] curve_admins_dir``.

How a caller is known, from what libzmq tells about the connection of a
message (its ``Peer-Address`` and ``User-Id`` properties): on a unix socket,
libzmq reads the peer's credentials from the kernel (``SO_PEERCRED``) and
gives ``host:uid:gid:pid``, which the caller cannot forge; with CURVE, the
authenticator gives the client's public key. Plain TCP carries neither:
its callers run jobs and nothing more.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass

import zmq

log = logging.getLogger("gpuvisor")


@dataclass(frozen=True)
class Caller:
    operator: bool
    who: str  # for the log: "uid 1000 (alice) pid 4242", "CURVE key rq:rM...", "127.0.0.1"
    # Whose share of the queue its jobs take: a user other than the daemon's own and root ("uid:1001"), a
    # CURVE key; None: its connection's own (the daemon's user may run many services, each its share).
    share: str | None = None


class Operators:
    def __init__(self, admin_group: str = "", admin_keys: frozenset[str] = frozenset()):
        """``admin_group``: a group name ("" none); ``admin_keys``: the z85
        public keys of admin CURVE certificates. A group that does not exist
        is refused here: a typo must not quietly lock the operators out."""
        self.admin_gid: int | None = None
        if admin_group:
            try:
                self.admin_gid = grp.getgrnam(admin_group).gr_gid
            except KeyError:
                raise ValueError(f"[daemon] admin_group {admin_group!r} is not a group on this machine") from None
        self.admin_group = admin_group
        self.admin_keys = admin_keys

    def caller(self, frame: zmq.Frame) -> Caller:
        """Who sent ``frame`` (any part of a message just received)."""
        key = _property(frame, "User-Id")
        if key:  # CURVE, through the authenticator
            return Caller(key in self.admin_keys, f"CURVE key {key[:12]}...", f"curve:{key}")
        address = _property(frame, "Peer-Address") or ""
        parts = address.rsplit(":", 3)
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):  # a unix socket: host:uid:gid:pid
            uid, gid, pid = (int(p) for p in parts[1:])
            share = None if uid in (0, os.getuid()) else f"uid:{uid}"  # all of a user's connections: one share
            return Caller(self.allows(uid, gid), f"uid {uid} ({_user(uid)}) pid {pid}", share)
        return Caller(False, address or "an unknown peer")

    def allows(self, uid: int, gid: int) -> bool:
        """Whether the user ``uid`` (its primary group ``gid``) is an operator."""
        if uid in (0, os.getuid()):
            return True
        if self.admin_gid is None:
            return False
        if gid == self.admin_gid:
            return True
        try:
            user = pwd.getpwuid(uid)
            return user.pw_gid == self.admin_gid or user.pw_name in grp.getgrgid(self.admin_gid).gr_mem
        except KeyError:
            return False


def _property(frame: zmq.Frame, name: str) -> str | None:
    try:
        value = frame.get(name)
    except zmq.ZMQError:  # not set for this connection
        return None
    return value if isinstance(value, str) else None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"
