"""Where a daemon is reached: its default endpoint, and a quick probe of
whether anything answers there. A socket file that is missing or refuses
the connection means no daemon, known at once rather than after a silence.
Shared by the clients and the daemon, which binds the same default.

A client trusts the default endpoint only in a folder that is its own user's
and that nobody else can change: ``/tmp/gpuvisor-<uid>`` can be made by any
local user first, who could then serve a fake daemon there and read every
job sent to it (the daemon refuses such a folder too, when it binds)."""

from __future__ import annotations

import os
import pwd
import socket
import stat
from collections.abc import Mapping

from protocol import DaemonUnavailable

SOCKET_NAME = "gpuvisor.sock"


class UnsafeRuntimeDir(DaemonUnavailable):
    """The folder of the default endpoint is another user's, or others can
    change it: whoever answers there may not be the daemon. The folder is at
    fault, not the caller; retrying cannot help until it is removed or
    fixed, or the daemon's endpoint is named."""

    code = "unsafe_runtime_dir"


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


def client_default_endpoint(environ: Mapping[str, str] = os.environ) -> str:
    """``default_endpoint`` for a client, once its folder passed
    ``check_runtime_dir``."""
    check_runtime_dir(runtime_dir(environ))
    return default_endpoint(environ)


def check_runtime_dir(path: str) -> None:
    """Raise ``UnsafeRuntimeDir`` unless ``path`` is a folder of this user
    that nobody else can change, or does not exist (then nothing answers
    there, and the daemon that makes it will make it private)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    what_to_do = (
        "Connect to the daemon by its endpoint instead (--endpoint, or [daemon] endpoint in --config), "
        "or set XDG_RUNTIME_DIR to a folder of your own (systemd's /run/user/UID)"
    )
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRuntimeDir(
            f"the runtime folder {path} is not a folder; refusing to look for the daemon there. "
            f"Remove it if it is stale (rm {path}). {what_to_do}"
        )
    if st.st_uid != os.getuid():
        raise UnsafeRuntimeDir(
            f"the runtime folder {path} belongs to {_user(st.st_uid)}, not to you ({_user(os.getuid())}): whoever "
            f"made it could answer there in the daemon's place. Remove it if it is stale (as root: rm -r {path}). "
            f"{what_to_do}"
        )
    if st.st_mode & 0o022:
        raise UnsafeRuntimeDir(
            f"the runtime folder {path} can be changed by others (mode {stat.S_IMODE(st.st_mode):04o}): they could "
            f"answer there in the daemon's place. Make it yours alone: chmod 700 {path}"
        )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def unreachable(endpoint: str, timeout: float) -> str | None:
    """Why nothing can answer at ``endpoint``, found at once with one plain
    connect; None when something accepted the connection, or for a
    transport this cannot tell about. A missing socket file (or directory)
    or a refused connection (a stale file) needs no waiting for a reply."""
    path = ipc_path(endpoint)
    if path is not None:
        shown = path
        address: str | tuple[str, int] = "\0" + path[1:] if path.startswith("@") else path  # @: abstract
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if not port.isdigit() or not host or "*" in host or ";" in host:
            return None  # a source address or a wildcard: libzmq's syntax, not ours to parse
        shown, address = f"{host}:{port}", (host.strip("[]"), int(port))
    else:
        return None
    try:
        if isinstance(address, str):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(timeout)
                probe.connect(address)
        else:
            socket.create_connection(address, timeout=timeout).close()
    except FileNotFoundError:
        return f"there is no socket file {shown}"
    except ConnectionRefusedError:
        stale = path is not None and not path.startswith("@")
        return f"{shown} refuses connections" + (" (a stale socket file: its daemon is gone)" if stale else "")
    except PermissionError:
        return f"permission denied on {shown}: only the daemon's user, or its [daemon] socket_group, may connect"
    except TimeoutError:
        return f"{shown} accepted no connection within {timeout:g}s"
    except OSError as exc:  # no route, an unknown host, a path too long ...
        return f"cannot connect to {shown}: {exc.strerror or exc}"
    return None
