"""Where the daemon listens, and who may talk to it.

The front socket is a local door to a GPU: by default an ``ipc://`` socket
in a directory only the daemon's user can enter (0700), the socket itself
0600, or 0660 for a configured group, set explicitly so the umask does not
decide. ZeroMQ's ``ipc://`` bind silently unlinks and replaces a socket
file, so a second daemon would steal the first one's clients; we probe the
path first and refuse to start over a live daemon, and only replace a stale
file. TCP is allowed on loopback only, unless CURVE keys authenticate and
encrypt the clients; anything else is refused with the reason.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import os
import socket
import stat
from collections.abc import Iterator, Mapping

from protocol import GpuvisorError

SOCKET_NAME = "gpuvisor.sock"


class EndpointError(GpuvisorError):
    """The front endpoint cannot be used as configured (in use by a live
    daemon, not ours, or unsafe). The message says why and what to change."""

    code = "endpoint_error"


class EndpointInUse(EndpointError):
    """A live daemon already serves this endpoint; it keeps serving."""

    code = "endpoint_in_use"


def runtime_dir(environ: Mapping[str, str] = os.environ) -> str:
    """systemd's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``), else
    ``$XDG_RUNTIME_DIR/gpuvisor``, else a private ``/tmp/gpuvisor-<uid>``."""
    if environ.get("RUNTIME_DIRECTORY"):
        return environ["RUNTIME_DIRECTORY"].split(":")[0]
    if environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(environ["XDG_RUNTIME_DIR"], "gpuvisor")
    return f"/tmp/gpuvisor-{os.getuid()}"


def default_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    return f"ipc://{os.path.join(runtime_dir(environ), SOCKET_NAME)}"


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def _private_dir(path: str, group_gid: int | None) -> None:
    """The socket's directory. One we make is 0700 (0710 with a group, so
    members can reach the socket but not list). One that exists already (a
    systemd RuntimeDirectory, say) is never changed, only checked: ours, a
    real directory, and writable by nobody else, or we refuse."""
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
        if group_gid is not None:
            os.chown(path, -1, group_gid)
        os.chmod(path, 0o710 if group_gid is not None else 0o700)
    elif st.st_mode & 0o022:
        raise EndpointError(
            f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); refusing to put the socket there"
        )


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


def check_tcp(endpoint: str, curve: bool) -> None:
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not curve:
        raise EndpointError(
            f"{endpoint} would let anyone who can reach that address run jobs on this GPU; "
            "use ipc://, a loopback address (tcp://127.0.0.1:PORT), or configure CURVE "
            "([daemon] curve_secret_key and curve_clients_dir)"
        )


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind_front(sock, endpoint: str, *, group: str = "", curve: bool = False) -> tuple[int, int] | None:
    """Bind ``sock`` to ``endpoint`` after the checks above, with the socket
    file's mode fixed (umask 0177 during the bind, so no moment of a wider
    mode exists, then the final mode and group)."""
    if endpoint.startswith("tcp://"):
        check_tcp(endpoint, curve)
        sock.bind(endpoint)
        return None
    path = ipc_path(endpoint)
    if path is None:
        raise EndpointError(f"{endpoint}: the front socket must be ipc:// or tcp://")
    if not path.startswith("/"):
        # An abstract socket (@name) has no file permissions: anyone could connect.
        raise EndpointError(f"{endpoint}: an ipc:// endpoint must be an absolute file path (not @abstract or relative)")
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise EndpointError(f"socket_group {group!r} is not a group on this machine") from None
    _private_dir(os.path.dirname(path), gid)
    claim_ipc(path)
    with _umask(0o177):
        sock.bind(endpoint)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, 0o660 if gid is not None else 0o600)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def release_ipc(endpoint: str, bound: tuple[int, int] | None) -> None:
    """Remove our socket file, and only ours: a daemon that started after us
    on the same path (once we stopped answering) owns the file now."""
    path = ipc_path(endpoint)
    if path is None or bound is None:
        return
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == bound:
            os.unlink(path)
    except FileNotFoundError:
        pass
