"""Commands that API threads hand to the core loop, and the mailbox they go
through. A command carries the caller's Future; the loop gives it its one
outcome with ``settle()``."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class QueuedJob:
    id: int
    task: str
    frames: list[bytes]  # the JOB message, encoded by the submitting thread
    mode: str | None
    timeout: float | None
    future: Future
    retries: int = 0  # the caller's word that the job is idempotent: runs again after a crash
    deadline: float | None = None
    on_chunk: Callable[[Any], None] | None = None  # a streamed job's sink, called on the loop thread
    chunks: int = 0  # CHUNKs received so far; the next must carry seq chunks + 1
    stream_broken: bool = False  # a chunk could not be read: the stream ended with an error, later chunks are ignored


@dataclass(eq=False)
class QueuedSwitch:
    mode: str | None  # None only with ``force``: restart the mode in force
    future: Future | None  # None: implicit, for a job that names its mode
    force: bool = False  # restart(): a fresh worker even if the mode is loaded


@dataclass(eq=False)
class Shutdown:
    drain: bool
    timeout: float | None
    future: Future = field(default_factory=Future)


@dataclass(eq=False)
class Reload:
    """Swap the configuration (SIGHUP). The loaded worker is left alone; a
    mode's new entry applies the next time that mode is loaded."""

    config: Any
    future: Future = field(default_factory=Future)


Command = QueuedJob | QueuedSwitch | Shutdown | Reload


class Mailbox:
    """Where API threads leave commands for the loop. Closing it hands back
    whatever arrived too late, so no command is ever silently lost."""

    def __init__(self) -> None:
        self._items: collections.deque[Command] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def fd(self) -> int:
        return self._wake_r

    def put(self, command: Command) -> bool:
        # The write happens under the lock too: close() must not close the
        # pipe between our append and our write (the fd could be reused).
        # One wake-up byte per batch, not per command: a burst of submits
        # costs the loop one wake-up and the submitters no syscalls.
        with self._lock:
            if self._closed:
                return False
            self._items.append(command)
            if len(self._items) == 1:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass  # the pipe is full, so the loop is already due to wake
        return True

    def take_all(self) -> list[Command]:
        with self._lock:
            drain_wakeups(self._wake_r)  # under the lock: a put() after this sees an empty deque and writes again
            items = list(self._items)
            self._items.clear()
        return items

    def close(self) -> list[Command]:
        with self._lock:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return left


def drain_wakeups(fd: int) -> None:
    """Empty a non-blocking wake-up pipe: the bytes mean only "look again"."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Give a future its one outcome. A queued future the caller cancelled is
    left cancelled: cancellation was its outcome."""
    if not future.done() and not future.running():
        if not future.set_running_or_notify_cancel():
            return
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
