"""Where a daemon is reached: its default endpoint, and a quick probe of
whether anything answers there. A socket file that is missing or refuses
the connection means no daemon, known at once rather than after a silence.
Shared by the clients and the daemon, which binds the same default."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SOCKET_NAME = "gpuvisor.sock"


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
