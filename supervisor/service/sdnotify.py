"""systemd's notify protocol (sd_notify(3)), in pure Python.

Why pure Python: the protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines
sent to the socket named by ``$NOTIFY_SOCKET``; that is a dozen lines of code,
not worth a compiled dependency (python-systemd needs libsystemd headers to
build, and is absent from most wheels-only installs).

Why one datagram per call: systemd reads each datagram as one message and
applies all of its lines together, so ``send("READY=1", "STATUS=serving")``
flips the unit to active and sets its status atomically. The socket is
connectionless and the sender keeps nothing open between calls.

What each message means to systemd (man sd_notify):

``READY=1``
    With ``Type=notify`` the unit stays "activating" (and ``systemctl start``
    blocks) until this arrives; units ordered after us start only then.
``STATUS=text``
    Free text shown by ``systemctl status``; it has no effect on state.
``STOPPING=1``
    We have begun shutting down (the unit shows "deactivating").
``RELOADING=1`` (with ``MONOTONIC_USEC=``)
    We have begun reloading configuration; send ``READY=1`` when done.
    systemd 253+ (``Type=notify-reload``) wants the ``CLOCK_MONOTONIC``
    timestamp next to it to match the reload to the request.
``EXTEND_TIMEOUT_USEC=n``
    Extends the running start/stop/reload timeout to *n* microseconds from
    now: a slow startup (a model load) or a long drain can ask for more time
    instead of being killed. Send it again before it runs out.
``WATCHDOG=1``
    Keep-alive for ``WatchdogSec=``: if none arrives within that time, systemd
    considers the service hung and kills it (and ``Restart=`` applies).
    :attr:`Notifier.watchdog_interval` says how often to send it.

Without ``$NOTIFY_SOCKET`` (not run by systemd, or ``Type=simple``) every call
is a no-op returning False, so callers never need to check. Sending never
raises: notification is advisory, and a daemon must not die because its
service manager went away.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("gpuvisor")

# A datagram to a socket whose receive queue is full blocks; systemd drains its
# queue promptly, but a wedged manager must not wedge us.
_SEND_TIMEOUT = 2.0


def _parse_address(value: str) -> str | None:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value, or None when it is
    of a kind we cannot send to (sd_notify accepts an absolute path or an
    ``@``-prefixed abstract name; newer systemd also knows ``vsock:``)."""
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace: a leading NUL byte
    if value.startswith("/"):
        return value
    return None


def _parse_positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        return None
    return n if n > 0 else None


class Notifier:
    """Sends notifications to systemd. Build it with :meth:`from_environ`."""

    def __init__(
        self,
        notify_socket: str | None = None,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._socket_value = notify_socket or None
        self._address = _parse_address(notify_socket) if notify_socket else None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._lock = threading.Lock()
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        A malformed ``WATCHDOG_PID`` is kept as "not ours" (pid 0), so the
        watchdog stays off, as sd_watchdog_enabled(3) does."""
        pid_value = environ.get("WATCHDOG_PID")
        watchdog_pid: int | None = None
        if pid_value is not None:
            watchdog_pid = _parse_positive_int(pid_value) or 0
        return cls(
            notify_socket=environ.get("NOTIFY_SOCKET"),
            watchdog_usec=_parse_positive_int(environ.get("WATCHDOG_USEC")),
            watchdog_pid=watchdog_pid,
        )

    @property
    def enabled(self) -> bool:
        """Whether a ``NOTIFY_SOCKET`` was given (we run under systemd with
        ``Type=notify`` or similar)."""
        return self._socket_value is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, as
        sd_watchdog_enabled(3) recommends. None when systemd asked for no
        watchdog, or asked it of another process (``WATCHDOG_PID`` is set and
        is not ours: we inherited the variables from a parent)."""
        if self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def _warn_once(self, message: str, *args: object) -> None:
        with self._lock:
            first = not self._warned
            self._warned = True
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def send(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram. True when it was sent; False when
        disabled or when sending failed (logged once at WARNING, then DEBUG).
        Never raises."""
        if not self.enabled or not lines:
            return False
        if self._address is None:
            self._warn_once("sd_notify: unsupported NOTIFY_SOCKET %r; notifications are off", self._socket_value)
            return False
        data = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(_SEND_TIMEOUT)
                sock.sendto(data, self._address)
        except (OSError, ValueError) as exc:
            self._warn_once("sd_notify: cannot send to NOTIFY_SOCKET %r: %s", self._socket_value, exc)
            return False
        return True

    # -- the messages -----------------------------------------------------

    def ready(self) -> bool:
        """Startup (or a reload) is complete."""
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Set the status line ``systemctl status`` shows."""
        ok = self.send(f"STATUS={_one_line(text)}")
        if ok:
            with self._lock:
                self._last_status = _one_line(text)
        return ok

    def status_changed(self, text: str) -> bool:
        """Send ``STATUS=text`` only when it differs from the last status sent,
        so a loop can call it every turn. Returns whether it sent."""
        with self._lock:
            if _one_line(text) == self._last_status:
                return False
        return self.status(text)

    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """A reload has begun; call :meth:`ready` when it is done."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more (from now) on the current start, stop or
        reload timeout."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog(self) -> bool:
        """Watchdog keep-alive; send every :attr:`watchdog_interval` seconds."""
        return self.send("WATCHDOG=1")


def _one_line(text: str) -> str:
    # A newline would end the STATUS= line and start a new (bogus) assignment.
    return " ".join(str(text).splitlines())
