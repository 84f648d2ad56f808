"""Where the daemon listens, and who may talk to it.

The front socket is a local door to a GPU: by default an ``ipc://`` socket
in a directory only the daemon's user can enter (0700), the socket itself
0600, or 0660 for a configured group, set explicitly so the umask does not
decide. ZeroMQ's ``ipc://`` bind silently unlinks and replaces a socket
file, so a second daemon would steal the first one's clients; we probe the
path first and refuse to start over a live daemon, and only replace a stale
file. TCP is allowed only with CURVE keys that authenticate and encrypt the
clients, or on loopback when the configuration accepts, in words, that every
local user may then connect (file permissions do not apply to TCP); anything
else is refused with the reason.

"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator

from protocol import GpuvisorError
from supervisor.client.endpoint import ipc_path
from supervisor.config_http import loopback_host

log = logging.getLogger("gpuvisor")


class EndpointError(GpuvisorError):
    """The front endpoint cannot be used as configured (in use by a live
    daemon, not ours, or unsafe). The message says why and what to change."""

    code = "endpoint_error"


class EndpointInUse(EndpointError):
    """A live daemon already serves this endpoint; it keeps serving."""

    code = "endpoint_in_use"


def _private_dir(path: str, group: tuple[str, int] | None) -> None:
    """The socket's directory. One we make is 0700 (0710 with a group, so
    members can reach the socket but not list). One that exists already (a
    systemd RuntimeDirectory, say) is never changed, only checked: ours, a
    real directory, writable by nobody else, and passable by the socket's
    group when there is one, or we refuse."""
    try:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        created = False
    except OSError as exc:
        raise EndpointError(f"cannot make the socket directory {path}: {exc}") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise EndpointError(f"{path} is not a directory owned by uid {os.getuid()}; refusing to put the socket there")
    if created:
        if group is not None:
            os.chown(path, -1, group[1])
        os.chmod(path, 0o710 if group is not None else 0o700)
    elif st.st_mode & 0o022:
        raise EndpointError(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); refusing to put the socket there"
        )
    elif group is not None and not _passable(st, group[1]):
        raise EndpointError(
            f"socket_group {group[0]!r} cannot reach the socket: its directory {path} is mode "
            f"{stat.S_IMODE(st.st_mode):04o}, group {_group_name(st.st_gid)}, and this daemon never changes a "
            f"directory it did not make. Give the directory the group {group[0]!r} and mode 0710 (under systemd: "
            f"Group={group[0]} and RuntimeDirectoryMode=0710, as contrib/systemd/gpuvisor.service has), or mode "
            "0711, or unset socket_group"
        )
    if group is not None:
        _warn_if_closed_above(path, group)


def _passable(st: os.stat_result, gid: int) -> bool:
    """Whether members of group ``gid`` (not the owner) may pass through a directory."""
    return bool(st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010))


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _warn_if_closed_above(path: str, group: tuple[str, int]) -> None:
    """A directory above the socket's that the group cannot pass keeps its
    members out too; it is not ours to judge (a private parent may be meant),
    so it is said, not refused."""
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        try:
            st = os.stat(parent)
        except OSError:
            return
        if not _passable(st, group[1]):
            log.warning(
                "socket_group %r cannot pass %s (mode %04o, group %s) on the way to the socket",
                group[0],
                parent,
                stat.S_IMODE(st.st_mode),
                _group_name(st.st_gid),
            )
            return
        parent = os.path.dirname(parent)


def claim_ipc(path: str) -> None:
    """Refuse a path a live daemon serves; remove a stale socket file."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise EndpointError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: its daemon is gone
        return
    except OSError as exc:
        raise EndpointError(f"cannot tell whether a daemon serves {path}: {exc}") from None
    finally:
        probe.close()
    raise EndpointInUse(f"another gpuvisor daemon is serving {path}; stop it first (gpuvisor stop)")


def _is_loopback(endpoint: str) -> bool:
    return loopback_host(endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]"))


def check_tcp(endpoint: str, curve: bool) -> None:
    if not curve and not _is_loopback(endpoint):
        raise EndpointError(
            f"{endpoint} would let anyone who can reach that address run jobs on this GPU; "
            "use ipc://, a loopback address (tcp://127.0.0.1:PORT, with [daemon] allow_unauthenticated_tcp = true), "
            "or configure CURVE ([daemon] curve_secret_key and curve_clients_dir)"
        )


def check_front(endpoint: str, *, curve: bool, allow_unauthenticated_tcp: bool) -> None:
    """What the configuration must say before ``endpoint`` is served: plain
    TCP, loopback included, lets every local user in (file permissions do not
    apply to it), so it needs ``allow_unauthenticated_tcp``, and is logged."""
    if not endpoint.startswith("tcp://") or curve:
        return
    check_tcp(endpoint, curve)
    if not allow_unauthenticated_tcp:
        raise EndpointError(
            f"{endpoint} has no authentication: every local user could run jobs on this GPU (the ipc:// "
            "socket's file permissions do not apply to TCP). Use ipc:// (with [daemon] socket_group to share "
            "it), configure CURVE ([daemon] curve_secret_key and curve_clients_dir), or accept it with "
            "[daemon] allow_unauthenticated_tcp = true"
        )
    log.warning(
        "serving %s without authentication (allow_unauthenticated_tcp = true): every local user can run jobs "
        "on this GPU",
        endpoint,
    )


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_front(
    sock, endpoint: str, *, group: str = "", curve: bool = False, allow_unauthenticated_tcp: bool = False
) -> tuple[int, int] | None:
    """Bind ``sock`` to ``endpoint`` after the checks above, with the socket
    file's mode fixed (umask 0177 during the bind, so no moment of a wider
    mode exists, then the final mode and group)."""
    if endpoint.startswith("tcp://"):
        check_front(endpoint, curve=curve, allow_unauthenticated_tcp=allow_unauthenticated_tcp)
        sock.bind(endpoint)
        return None
    path = ipc_path(endpoint)
    if path is None:
        raise EndpointError(f"{endpoint}: the front socket must be ipc:// or tcp://")
    if not path.startswith("/"):
        # An abstract socket (@name) has no file permissions: anyone could connect.
        raise EndpointError(f"{endpoint}: an ipc:// endpoint must be an absolute file path (not @abstract or relative)")
    return bind_unix(path, lambda: sock.bind(endpoint), group=group)


def bind_unix(path: str, bind: Callable[[], None], *, group: str = "") -> tuple[int, int]:
    """Make the socket file at ``path`` with ``bind()``, under the rules of
    this module: a private directory, never over a live daemon's socket,
    mode 0600 (0660 for ``group``) from the first moment. Shared by every
    door the daemon opens on a file (ZeroMQ's ipc://, HTTP's unix socket).
    Returns the file's identity for ``release_path``."""
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise EndpointError(f"socket_group {group!r} is not a group on this machine") from None
    _private_dir(os.path.dirname(path), None if gid is None else (group, gid))
    claim_ipc(path)
    with _umask(0o177):
        bind()
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o660 if gid is not None else 0o600)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def release_ipc(endpoint: str, bound: tuple[int, int] | None) -> None:
    """Remove our socket file, and only ours: a daemon that started after us
    on the same path (once we stopped answering) owns the file now."""
    path = ipc_path(endpoint)
    if path is not None:
        release_path(path, bound)


def release_path(path: str, bound: tuple[int, int] | None) -> None:
    """``release_ipc`` for a socket file named by its path."""
    if bound is None:
        return
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == bound:
            os.unlink(path)
    except FileNotFoundError:
        pass
