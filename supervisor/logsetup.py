"""Logging for the daemon: stderr, in the form the reader of stderr wants.

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
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import IO

PLAIN_FORMAT = "%(asctime)s gpuvisor %(levelname)s %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(message)s"

# The marker on the handler we install, so a second call replaces it.
_HANDLER_ATTR = "_gpuvisor_handler"


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


def configure_logging(verbose: bool = False, stream: IO[str] | None = None) -> None:
    """Send the ``gpuvisor`` logger (and the root logger, so libraries' records
    land in the same place) to ``stream`` (default: ``sys.stderr``), in the
    journal form when that stream is journald's, else plain with timestamps.
    Level INFO, or DEBUG when ``verbose``. Calling it again replaces the
    handler it installed before instead of adding a second one."""
    if stream is None:
        stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if stderr_is_journal(stream) else logging.Formatter(PLAIN_FORMAT))
    setattr(handler, _HANDLER_ATTR, True)

    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_ATTR, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # The records propagate to root's handler; gpuvisor itself gets no handler
    # (that would print each line twice), only the level.
    logging.getLogger("gpuvisor").setLevel(level)
