"""systemd's side of sd_notify for the tests: a real AF_UNIX datagram socket
that the code under test is pointed at through NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from tests.helpers import T


class NotifyReceiver:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET. A thread
    reads it as systemd does, so a sender never finds it full; a test takes
    the datagrams one by one (``next``) or waits for a line (``wait_note``).
    Every wait is bounded."""

    def __init__(self, path: str | None = None):
        """Bound at ``path``; without one, at a fresh abstract address. Either
        way ``address`` is the value for NOTIFY_SOCKET."""
        name = f"gpuvisor-test-{os.getpid()}-{uuid.uuid4().hex}"
        self.address = path if path is not None else "@" + name
        self.datagrams: list[str] = []
        self.notes: list[str] = []
        """Every line of every datagram, in the order they came."""
        self._taken = 0
        self._arrived = threading.Condition()
        self._closing = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path if path is not None else "\0" + name)
        self._sock.settimeout(0.1)  # how often the reader looks for close()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            try:
                datagram = self._sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._arrived:
                self.datagrams.append(datagram)
                self.notes.extend(datagram.split("\n"))
                self._arrived.notify_all()

    def next(self, timeout: float = T) -> str:
        """The next datagram no ``next`` returned yet; TimeoutError if none
        comes within ``timeout``."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.datagrams) > self._taken, timeout):
                raise TimeoutError(f"no datagram within {timeout}s")
            self._taken += 1
            return self.datagrams[self._taken - 1]

    def wait_note(self, line: str, after: int = 0, timeout: float = T,
                  alive: Callable[[], bool] | None = None) -> int | None:  # fmt: skip
        """The index in ``notes`` of the first note from ``after`` on that is
        ``line`` (or, for a ``line`` ending in ``=``, starts with it); None
        once ``alive()`` says the sender is gone and it did not come. Fails
        once ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        gone = False
        with self._arrived:
            while True:
                for i, note in enumerate(self.notes[after:], after):
                    if note == line or (line.endswith("=") and note.startswith(line)):
                        return i
                if gone:
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {line!r} within {timeout}s; got {self.notes}")
                gone = alive is not None and not alive()  # then one more look: its last datagrams may be in flight
                self._arrived.wait(min(left, 0.2 if gone else 0.05))

    def close(self) -> None:
        self._closing.set()
        self._reader.join(T)
        self._sock.close()

    def __enter__(self) -> NotifyReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
