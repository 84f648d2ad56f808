"""Logging for the daemon and the CLI: stderr, in the form the reader of
stderr wants, and never in the way of the thread that logs.

Under systemd, stderr is usually a stream connected to journald, and systemd
says so by setting ``JOURNAL_STREAM=<device>:<inode>`` for the stream it gave
us. journald then timestamps every line itself and reads an optional
``<N>`` prefix (a syslog priority, 0-7) as the line's priority, which is what
``journalctl -p warning`` filters on and what colours the output. So when our
stderr *is* that stream, each line starts with ``<N>`` and carries no
timestamp of its own; otherwise (a terminal, a pipe, a file, or stderr
redirected after systemd started us, which leaves a stale ``JOURNAL_STREAM``
behind) lines are plain with a timestamp.

See systemd.exec(5), "JOURNAL_STREAM", and sd-daemon(3) for the prefixes.

A reader of stderr that is slow or stopped (a full pipe) must not stall the
loops, so a thread that logs only puts the record on a bounded queue (the
standard library's ``QueueHandler``); one listener thread
(``QueueListener``) writes the lines. When the queue is full a record is
dropped and counted, and a later line says how many. A message logged over
and over from one place is let through ``REPEAT_LIMIT`` times per
``REPEAT_WINDOW_S``; then one line says how many more there were.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from logging.handlers import QueueHandler, QueueListener
from typing import IO

PLAIN_FORMAT = "%(asctime)s gpuvisor %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(message)s"

# The marker on the handler we install, so a second call replaces it.
_HANDLER_ATTR = "_gpuvisor_handler"

QUEUE_SIZE = 10_000
"""Records waiting for the writer; past it, records are dropped and counted."""
REPEAT_LIMIT = 20
"""Records with the same message template from the same line let through per window ..."""
REPEAT_WINDOW_S = 10.0
"""... of this many seconds."""
MAX_WINDOWS = 4096
"""Places and templates followed at once; past it, new ones are not limited."""
_TICK_S = 1.0  # how often the listener looks for finished windows while nothing is logged
_STOP_WAIT_S = 2.0  # at exit, how long the last lines may take to get out (a stuck stderr may never take them)


def journal_priority(levelno: int) -> int:
    """The syslog priority (sd-daemon(3)) for a logging level: DEBUG 7,
    INFO 6, WARNING 4, ERROR 3, CRITICAL 2. A level between two named ones
    takes the priority of the named level at or below it."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stderr_is_journal(stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (default: ``sys.stderr``) is the journald stream
    that ``JOURNAL_STREAM`` names, compared by device and inode."""
    if stream is None:
        stream = sys.stderr
    if environ is None:
        environ = os.environ
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        want = (int(device), int(inode))
        st = os.fstat(stream.fileno())
    except (AttributeError, ValueError, OSError):
        # No such variable in a usable form, or a stream without a file
        # descriptor (io.UnsupportedOperation is both OSError and ValueError).
        return False
    return (st.st_dev, st.st_ino) == want


class JournalFormatter(logging.Formatter):
    """Prefixes every line of a record with its ``<N>`` priority. journald
    parses the prefix per line, so a traceback's later lines get it too;
    without it they would be logged at the default priority (info)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{journal_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0
    last: logging.LogRecord | None = None  # the last one suppressed


class RepeatFilter(logging.Filter):
    """Lets through ``limit`` records per ``window`` seconds for each message
    template logged from one place (logger, file, line); counts the rest.
    ``due()`` gives one summary record per window that suppressed any, once
    the window is over."""

    def __init__(
        self, limit: int = REPEAT_LIMIT, window: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__()
        self.limit = limit
        self.window = window
        self.clock = clock
        self._windows: dict[tuple, _Window] = {}
        self._lock = threading.Lock()  # records come from every thread; due() runs on the listener's

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "every_one", False):  # a record of every event (an access log): never held back
            return True
        key = (record.name, record.pathname, record.lineno, str(record.msg))
        now = self.clock()
        with self._lock:
            w = self._windows.get(key)
            if w is None and len(self._windows) >= MAX_WINDOWS:
                return True  # messages made anew each time (no template): not counted, never held back
            if w is None or now - w.start >= self.window:
                if w is not None and w.suppressed:  # its summary is still due: keep it under another key
                    self._windows[(*key, w.start)] = w
                w = self._windows[key] = _Window(now)
            if w.passed < self.limit:
                w.passed += 1
                return True
            w.suppressed += 1
            w.last = record
            return False

    def due(self, final: bool = False) -> list[logging.LogRecord]:
        """Summaries of the windows that are over (all of them if ``final``);
        finished windows are forgotten."""
        now = self.clock()
        out = []
        with self._lock:
            for key, w in list(self._windows.items()):
                if final or now - w.start >= self.window:
                    del self._windows[key]
                    if w.suppressed:
                        out.append(self._summary(w, min(now - w.start, self.window)))
        return out

    @staticmethod
    def _summary(w: _Window, seconds: float) -> logging.LogRecord:
        last = w.last
        if last is None:
            raise RuntimeError("a window that suppressed nothing has no summary")
        text = last.getMessage().split("\n", 1)[0]
        if len(text) > 200:
            text = text[:200] + "..."
        message = "dropped %s more like this in %.0f s (the last: %s)"
        args = (f"{w.suppressed:,}", seconds, text)
        return logging.LogRecord(last.name, last.levelno, last.pathname, last.lineno, message, args, None)


class DroppingQueueHandler(QueueHandler):
    """``QueueHandler`` that never blocks: a record that finds the queue full
    is dropped and counted."""

    def __init__(self, q: queue.Queue) -> None:
        super().__init__(q)
        self.records: queue.Queue = q
        self.dropped = 0  # changed under _count_lock
        self._count_lock = threading.Lock()

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.records.put_nowait(record)
        except queue.Full:
            with self._count_lock:
                self.dropped += 1

    def take_dropped(self) -> int:
        with self._count_lock:
            n, self.dropped = self.dropped, 0
        return n


class _FdHandler(logging.StreamHandler):
    """Writes each line with ``os.write`` on the stream's file descriptor:
    a write that blocks holds no lock of ``sys.stderr``, so an exit while it
    blocks cannot deadlock the interpreter on that lock. A stream without a
    descriptor (a ``StringIO``) is written as a stream."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):
            self.fd = None

    def createLock(self) -> None:  # noqa: N802 - logging's name
        """No lock: only the listener thread writes, and a lock held across a
        blocked write would hang ``logging.shutdown()`` at exit, which takes
        every handler's lock."""
        self.lock = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self.fd is None:
                self.stream.write(line)
                self.flush()
                return
            data = line.encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            pass  # stderr is closed or gone: nobody is left to tell
        except Exception:  # noqa: BLE001 - a record that cannot be formatted: logging's own report
            self.handleError(record)


_SENTINEL = QueueListener._sentinel  # type: ignore[attr-defined]  # what stop() puts on the queue: the end


class _Listener(QueueListener):
    """The one writer. Between records, and at least once a ``_TICK_S``, it
    writes what was dropped and the summaries of finished repeat windows."""

    def __init__(self, q: queue.Queue, writer: logging.Handler, source: DroppingQueueHandler, repeats: RepeatFilter):
        super().__init__(q, writer)
        self.records: queue.Queue = q
        self.writer = writer
        self.source = source
        self.repeats = repeats
        self._next_summaries = 0.0

    def dequeue(self, block: bool) -> logging.LogRecord:
        while True:
            try:
                record = self.records.get(timeout=_TICK_S)
            except queue.Empty:
                self._report(summaries=True)
                continue
            final = record is _SENTINEL
            self._report(summaries=final or time.monotonic() >= self._next_summaries, final=final)
            return record

    def _report(self, summaries: bool, final: bool = False) -> None:
        dropped = self.source.take_dropped()
        if dropped:
            message = "dropped %s log records: the log queue was full (stderr is not keeping up)"
            record = logging.LogRecord("gpuvisor", logging.WARNING, __file__, 0, message, (f"{dropped:,}",), None)
            self.writer.handle(record)
        if summaries:  # a look at every window: once a tick, not once a record
            self._next_summaries = time.monotonic() + _TICK_S
            for summary in self.repeats.due(final):
                self.writer.handle(summary)

    def stop(self) -> None:
        """Let the last lines out, unless stderr is stuck: then give up after
        ``_STOP_WAIT_S`` (the thread is a daemon thread; the exit goes on)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + _STOP_WAIT_S
        try:
            self.records.put(_SENTINEL, timeout=_STOP_WAIT_S)
        except queue.Full:
            return  # the writer is stuck
        thread.join(max(0.0, deadline - time.monotonic()))


_current: tuple[DroppingQueueHandler, _Listener] | None = None
_lock = threading.Lock()


def configure_logging(verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Send the ``gpuvisor`` logger (and the root logger, so libraries' records
    land in the same place) to ``stream`` (default: ``sys.stderr``), in the
    journal form when that stream is journald's, else plain with timestamps,
    through a bounded queue and one writer thread (see the module's
    docstring). Level INFO, or DEBUG when ``verbose``. Calling it again
    replaces what it installed before instead of adding a second handler.
    The writer is stopped at exit, after the last lines."""
    global _current
    if stream is None:
        stream = sys.stderr
    writer = _FdHandler(stream)
    writer.setFormatter(JournalFormatter() if stderr_is_journal(stream) else logging.Formatter(PLAIN_FORMAT))
    records: queue.Queue = queue.Queue(QUEUE_SIZE)
    handler = DroppingQueueHandler(records)
    repeats = RepeatFilter()
    handler.addFilter(repeats)
    setattr(handler, _HANDLER_ATTR, True)
    listener = _Listener(records, writer, handler, repeats)

    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    with _lock:
        stop_logging()
        for old in [h for h in root.handlers if getattr(h, _HANDLER_ATTR, False)]:
            root.removeHandler(old)
            old.close()
        listener.start()
        _current = (handler, listener)
        root.addHandler(handler)
    root.setLevel(level)
    # The records propagate to root's handler; gpuvisor itself gets no handler
    # (that would print each line twice), only the level.
    logging.getLogger("gpuvisor").setLevel(level)


def stop_logging() -> None:
    """Write what is queued and stop the writer thread (bounded: a stuck
    stderr is given up on). Records logged afterwards are dropped."""
    global _current
    current, _current = _current, None
    if current is not None:
        handler, listener = current
        logging.getLogger().removeHandler(handler)
        listener.stop()


atexit.register(stop_logging)
