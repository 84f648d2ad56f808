"""A worker's stderr: passed on to ours up to a budget, and its last lines
kept for the crash report, because "killed by SIGSEGV" is only half of one.

The loop reads the pipe when its poll says so, without blocking. What is
passed on goes whole lines at a time, up to ``STDERR_RATE`` bytes a second
(``STDERR_BURST`` at once); the rest is dropped and counted, and a log line
says how much, as journald's rate limit does. The writing happens on a
thread of its own: a slow reader of our stderr must not stop the loop.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import IO

log = logging.getLogger("gpuvisor")

STDERR_TAIL_LINES = 12
_TAIL_SCAN = 4 * STDERR_TAIL_LINES  # lines looked at from the end of a read (more only if they are blank)
_READ_PER_TURN = 256 * 1024  # then back to the poll: a chatty worker must not starve the loop

STDERR_RATE = 1 << 20
"""Bytes of a worker's stderr passed on to ours per second, on average ..."""
STDERR_BURST = 4 << 20
"""... and at once, after a quiet spell. The rest is dropped (read, kept for
the crash report's tail, not written): a handler printing in a loop would
otherwise fill the disk under the log."""
STDERR_REPORT_S = 10.0
"""While a worker's stderr is being dropped, one line per this many seconds
says how much; and one when its stderr ends."""


class StderrBudget:
    """A token bucket: ``rate`` bytes a second, at most ``burst`` at once.
    The clock is the caller's, so it can be stepped by hand."""

    def __init__(self, now: float, rate: float = STDERR_RATE, burst: int = STDERR_BURST):
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, wanted: int, now: float) -> int:
        """How many of ``wanted`` bytes may go now (all, some, or none)."""
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        got = min(wanted, int(self._tokens))
        self._tokens -= got
        return got

    def give_back(self, unused: int) -> None:
        self._tokens = min(float(self.burst), self._tokens + unused)


_FORWARD_BUFFER = 16 << 20  # bytes waiting for our stderr; past it, dropped and counted


class _StderrForwarder(threading.Thread):
    """Writes workers' stderr to ours, off the loop thread: if whoever reads
    our stderr is slow or gone, a blocking write in the loop would stop job
    timeouts and hang checks. What waits is bounded in bytes (not in reads:
    a worker writing a line at a time makes a read of every line); past it,
    bytes are dropped and counted, and a line says so. What has piled up
    goes out in one write."""

    def __init__(self) -> None:
        super().__init__(name="gpuvisor-stderr", daemon=True)
        self._ready = threading.Condition(threading.Lock())
        self._chunks: list[bytes] = []  # these three under _ready
        self._size = 0
        self._dropped = 0

    def forward(self, chunk: bytes) -> None:
        with self._ready:
            if self._size + len(chunk) > _FORWARD_BUFFER:
                self._dropped += len(chunk)
                return
            self._chunks.append(chunk)
            self._size += len(chunk)
            self._ready.notify()

    def run(self) -> None:
        while True:
            with self._ready:
                while not self._chunks:
                    self._ready.wait()
                chunks, self._chunks, self._size = self._chunks, [], 0
                dropped, self._dropped = self._dropped, 0
            if dropped:
                chunks.insert(
                    0, f"[gpuvisor: {dropped} bytes of worker stderr dropped: our stderr is not keeping up]\n".encode()
                )
            data = memoryview(b"".join(chunks))
            try:
                while data:
                    data = data[os.write(2, data) :]
            except OSError:
                pass  # our stderr is gone; the tail for crash reports is kept by the handle


_forwarder: _StderrForwarder | None = None
_forwarder_lock = threading.Lock()


def _forward(chunk: bytes) -> None:
    global _forwarder
    if _forwarder is None or not _forwarder.is_alive():
        with _forwarder_lock:
            if _forwarder is None or not _forwarder.is_alive():
                _forwarder = _StderrForwarder()
                _forwarder.start()
    _forwarder.forward(chunk)


class StderrPipe:
    """One worker's stderr pipe, read by the loop; ``who`` names the worker in the log."""

    def __init__(self, pipe: IO[bytes] | None, who: str, now: float) -> None:
        self._pipe = pipe
        self.who = who
        self.fd: int | None = pipe.fileno() if pipe is not None else None
        if self.fd is not None:
            os.set_blocking(self.fd, False)
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""
        self._budget = StderrBudget(now)
        self._dropped = 0  # bytes of its stderr not passed on since a line last said so ...
        self._dropping_since = 0.0  # ... counted from then
        self._skip_line = False  # the line under way was cut: drop the rest of it
        self._open_line = False  # what was passed on ends inside a line

    def pump(self, budget: int = _READ_PER_TURN) -> None:
        """Read what the worker wrote, pass on what its budget allows, keep
        the tail. Never blocks, and reads at most ``budget`` bytes before
        going back to the poll."""
        now = time.monotonic()
        while self.fd is not None and budget > 0:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:  # EOF: the worker and everything that shared its stderr are gone
                self._close_stderr()
                break
            budget -= len(chunk)
            self._keep_tail(chunk)
            self._pass_on(chunk, now)
        if self._dropped and (self.fd is None or now - self._dropping_since >= STDERR_REPORT_S):
            self._say_dropped(now)

    def _pass_on(self, chunk: bytes, now: float) -> None:
        """Forward what the budget allows, in whole lines: when it runs out
        inside a line, the rest of that line is dropped too."""
        start = 0
        if self._skip_line:
            end = chunk.find(b"\n")
            if end < 0:
                self._count_dropped(len(chunk), now)
                return
            start = end + 1
            self._count_dropped(start, now)
            self._skip_line = False
        wanted = len(chunk) - start
        allowed = self._budget.take(wanted, now)
        if allowed == wanted:
            if wanted:
                _forward(chunk[start:] if start else chunk)
                self._open_line = not chunk.endswith(b"\n")
            return
        cut = chunk.rfind(b"\n", start, start + allowed) + 1  # after the last whole line that fits; 0: none
        cut = max(cut, start)
        self._budget.give_back(start + allowed - cut)
        if cut > start:
            _forward(chunk[start:cut])
            self._open_line = False
        elif self._open_line:  # end the line it was passing on, so what comes next starts a line of its own
            _forward(b"\n")
            self._open_line = False
        self._count_dropped(len(chunk) - cut, now)
        self._skip_line = not chunk.endswith(b"\n")

    def _count_dropped(self, n: int, now: float) -> None:
        if n and not self._dropped:
            self._dropping_since = now
        self._dropped += n

    def _say_dropped(self, now: float) -> None:
        log.warning(
            "dropped %s bytes of the stderr of %s in %.1f s: more than the %s KiB a second "
            "(%s KiB at once) passed on from a worker; its last lines are kept for crash reports",
            f"{self._dropped:,}",
            self.who,
            now - self._dropping_since,
            f"{STDERR_RATE // 1024:,}",
            f"{STDERR_BURST // 1024:,}",
        )
        self._dropped = 0

    def _keep_tail(self, chunk: bytes) -> None:
        data = self._partial + chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data[-4096:]
            return
        self._partial = data[end + 1 :][-4096:]
        # Only the last lines can stay in the tail: a flood is not split whole.
        parts = data[:end].rsplit(b"\n", _TAIL_SCAN)
        lines = [line for line in (parts if len(parts) <= _TAIL_SCAN else parts[1:]) if line.strip()]
        if len(lines) < STDERR_TAIL_LINES and len(parts) > _TAIL_SCAN:  # mostly blank lines: look further back
            lines = [line for line in data[:end].split(b"\n") if line.strip()]
        self._tail.extend(line.decode("utf-8", "replace").rstrip() for line in lines[-STDERR_TAIL_LINES:])

    def tail(self) -> list[str]:
        partial = self._partial.decode("utf-8", "replace").strip()
        return [*self._tail, *([partial] if partial else [])][-STDERR_TAIL_LINES:]

    def _close_stderr(self) -> None:
        if self.fd is not None and self._pipe is not None:
            self._pipe.close()
        self.fd = None

    def close(self) -> None:
        """After the reap: keep the last words, release the pipe. A
        grandchild may hold it open forever; we do not wait for it."""
        self.pump(budget=4 * _READ_PER_TURN)
        self._close_stderr()
        if self._dropped:
            self._say_dropped(time.monotonic())
