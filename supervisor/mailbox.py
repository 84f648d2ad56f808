"""A thread-safe inbox that a poll loop can wait on: a deque behind a lock,
plus a pipe whose read end becomes readable when something arrives.

The supervisor's loop takes commands from API threads through one, the
daemon takes replies from the loop through one, and the client's I/O
thread takes requests from callers through one. One wake-up byte per
burst, not per item: a burst of puts costs the loop one wake-up and the
putters no syscalls. Closing hands back whatever arrived too late, so no
item is ever silently lost.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


def empty_pipe(fd: int) -> None:
    """Read a non-blocking wake-up pipe empty: its bytes mean only "look again"."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._items: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def fd(self) -> int:
        """Readable when items wait: register it with the loop's poller."""
        return self._wake_r

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> bool:
        """False if the mailbox is closed (the item was not taken)."""
        # The write happens under the lock: close() must not close the pipe
        # between our append and our write (the fd could be reused).
        with self._lock:
            if self._closed:
                return False
            self._items.append(item)
            if len(self._items) == 1:
                self._wake()
        return True

    def wake(self) -> None:
        """Wake the reader with nothing to take (say, to look at a flag)."""
        with self._lock:
            if not self._closed:
                self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the reader is already due to wake

    def take_all(self) -> list[T]:
        with self._lock:
            if self._closed:
                return []
            empty_pipe(self._wake_r)  # under the lock: a put() after this sees an empty deque and writes again
            items = list(self._items)
            self._items.clear()
        return items

    def close(self) -> list[T]:
        """Refuse further puts; returns what was left untaken."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            left = list(self._items)
            self._items.clear()
            os.close(self._wake_r)
            os.close(self._wake_w)
        return left
