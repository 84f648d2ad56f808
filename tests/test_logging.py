"""The daemon's and the CLI's logging: a thread that logs never waits for
stderr; what a full queue drops is counted and said; a message repeated
from one place is said REPEAT_LIMIT times per window, then summed up in one
line; the last lines get out at exit. Each case runs ``configure_logging``
in a child process, with stderr a real pipe."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from supervisor.service.logsetup import QUEUE_SIZE, REPEAT_LIMIT, RepeatFilter
from tests.helpers import ROOT, T

STUCK = """
import logging, sys, time
from supervisor.service.logsetup import configure_logging
configure_logging()
log = logging.getLogger("gpuvisor")
t = time.monotonic()
for i in range(int(sys.argv[1])):
    log.info(f"line {i}")  # a template of its own each: none is a repeat
print(f"logged in {time.monotonic() - t:.3f}s", flush=True)
sys.stdin.readline()  # the test starts reading stderr, then says go on
log.info("the last line")  # written at exit, or counted as dropped
"""

REPEATS = """
import logging
from supervisor.service.logsetup import configure_logging
configure_logging()
log = logging.getLogger("gpuvisor")
for i in range(1500):
    log.warning("bad request from client %s: junk", i)
log.info("the last line")
"""


def child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


@pytest.mark.process
def test_a_stuck_stderr_never_blocks_logging_and_every_record_is_written_or_counted():
    n = QUEUE_SIZE * 3
    proc = child(STUCK, str(n))
    try:
        # Nobody reads stderr yet: its pipe fills, the writer thread blocks,
        # the queue fills; the logging thread must still get through.
        said = proc.stdout.readline()
        assert said.startswith("logged in"), said
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=T)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    lines = err.splitlines()
    written = sum(1 for line in lines if re.search(r" INFO line \d+$", line))
    dropped = [int(m.group(1).replace(",", "")) for m in re.finditer(r"dropped ([\d,]+) log records", err)]
    assert dropped, "no line said records were dropped"
    last = sum(1 for line in lines if line.endswith("INFO the last line"))  # dropped too if the queue was still full
    assert written + last + sum(dropped) == n + 1, (written, last, dropped)


@pytest.mark.process
def test_a_repeated_message_is_said_limit_times_then_summed_up_in_one_line():
    proc = child(REPEATS)
    out, err = proc.communicate(timeout=T)
    assert proc.returncode == 0, err
    lines = err.splitlines()
    said = [line for line in lines if "bad request from client" in line and "more like this" not in line]
    assert len(said) == REPEAT_LIMIT
    (summary,) = [line for line in lines if "more like this" in line]
    assert f"dropped {1500 - REPEAT_LIMIT:,} more like this in " in summary, summary
    assert "WARNING" in summary and "(the last: bad request from client 1499: junk)" in summary
    assert lines[-1].endswith("INFO the last line") or lines[-2].endswith("INFO the last line"), lines[-3:]


def record(msg: str, lineno: int = 1) -> logging.LogRecord:
    return logging.LogRecord("gpuvisor", logging.WARNING, "here.py", lineno, msg, (), None)


@pytest.mark.unit
def test_repeat_windows_on_a_fake_clock():
    now = [0.0]
    f = RepeatFilter(limit=3, window=10.0, clock=lambda: now[0])
    assert [f.filter(record("x %s")) for _ in range(5)] == [True, True, True, False, False]
    assert f.filter(record("x %s", lineno=2)), "another place is another window"
    assert f.filter(record("y %s")), "another template is another window"
    now[0] = 5.0
    assert f.due() == [], "no window is over yet"
    now[0] = 10.0
    assert f.filter(record("x %s")), "a new window"
    now[0] = 12.0
    (summary,) = f.due()  # the first window's, kept when the new one began
    assert summary.getMessage().startswith("dropped 2 more like this in 10 s")
    assert [f.filter(record("x %s")) for _ in range(3)] == [True, True, False]
    (final,) = f.due(final=True)
    assert final.getMessage().startswith("dropped 1 more like this in 2 s")
    assert f.due(final=True) == []
