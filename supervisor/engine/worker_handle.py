"""One worker process as the loop sees it: its state machine, the jobs
handed to it, how it is ending, and its stderr.

::

    SPAWNED --HELLO--> LOADING --READY--> READY <--outcome-- BUSY
       |                  |                 |  ----JOB---->   |
       |                  |                 +--DRAIN--> DRAINING
       +------------------+--------+--------+----------------+
                                   | stop() (SIGTERM) or kill() (SIGKILL)
                                   v
                               STOPPING --its pidfd fires, reaped--> EXITED
       (any state) --it dies on its own, reaped--------------------> EXITED

Every change goes through ``transition()``, which refuses a change from a
state not listed as its predecessor, so an impossible event (a RESULT while
LOADING) is caught where it happens instead of corrupting the queue.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol import GpuvisorError
from supervisor.config import ModeSpec
from supervisor.engine.commands import QueuedJob

log = logging.getLogger("gpuvisor")


class WorkerState(enum.Enum):
    SPAWNED = "spawned"  # process started, no HELLO yet
    LOADING = "loading"  # LOAD sent, waiting for READY
    READY = "ready"  # idle, mode loaded
    BUSY = "busy"  # jobs in flight
    DRAINING = "draining"  # DRAIN sent, waiting for exit 0
    STOPPING = "stopping"  # signalled; waiting for its exit
    EXITED = "exited"  # reaped; the handle is dead

    # Members are compared by identity: hash them so too, at C speed (the
    # state is looked up in a set several times a turn).
    __hash__ = object.__hash__


SERVING = frozenset({WorkerState.READY, WorkerState.BUSY, WorkerState.DRAINING})
STARTING = frozenset({WorkerState.SPAWNED, WorkerState.LOADING})
# Before HELLO the worker's heartbeat thread may not exist yet (load_timeout covers
# that); while DRAINING the exit deadline does.
HEARTBEATING = frozenset({WorkerState.LOADING, WorkerState.READY, WorkerState.BUSY})

_PREDECESSORS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.LOADING: frozenset({WorkerState.SPAWNED}),
    WorkerState.READY: frozenset({WorkerState.LOADING, WorkerState.BUSY}),
    WorkerState.BUSY: frozenset({WorkerState.READY}),
    WorkerState.DRAINING: frozenset({WorkerState.READY}),
    WorkerState.STOPPING: frozenset(set(WorkerState) - {WorkerState.STOPPING, WorkerState.EXITED}),
    WorkerState.EXITED: frozenset(set(WorkerState) - {WorkerState.EXITED}),
}


class IllegalTransition(RuntimeError):
    """A bug in the loop: an event arrived that the state machine forbids."""


@dataclass
class Ending:
    """Why a worker is ending, decided when the loop stops or kills it. A
    worker that dies on its own has none: its exit status says why."""

    why: str  # for the log, and the crash report when ``job_error`` is set
    job_error: type[GpuvisorError] | None = None  # what the running job gets; None: we stop it idle, on purpose
    job_id: int | None = None  # the job the cause is about (a timeout): another one running gets WorkerCrashed
    then: list = field(default_factory=list)  # outcomes handed out once it is reaped (future, result, error)


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
                chunks.insert(0, f"[gpuvisor: {dropped} bytes of worker stderr dropped: our stderr is not keeping up]\n"
                              .encode())  # fmt: skip
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


class WorkerHandle:
    """The loop's view of one worker process. Its stderr comes through a pipe
    the loop polls: it is passed on to our own stderr up to its budget
    (``STDERR_RATE``, ``STDERR_BURST``; whole lines, the rest dropped and
    counted, and a log line says how much, as journald's rate limit does),
    and the last lines of all of it are kept, because "killed by SIGSEGV" is
    only half a crash report."""

    def __init__(self, proc: subprocess.Popen, gen: int, spec: ModeSpec, pidfd: int | None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.proc = proc
        self.clock = clock
        self.gen = gen
        self.spec = spec
        self.identity = f"g{gen}".encode()  # its main socket: everything but heartbeats
        self.heartbeat_identity = f"h{gen}".encode()  # its heartbeat socket, if it has one
        self.state = WorkerState.SPAWNED
        self.started_at = clock()
        self.last_seen = self.started_at
        self.load_seconds: float | None = None
        self.batch: dict[str, dict[str, float]] = {}  # task -> limits, for handlers that take a batch (READY)
        self.warmup_seconds: float | None = None
        self.idle_since = self.started_at  # when it last became READY: idle_unload_s counts from here
        self.baseline_used: int | None = None  # device memory used before it started (NVML), for the reclaim
        self.hello_at: float | None = None
        # Jobs sent to it, in order: the head runs, the rest wait in its socket
        # (up to ``window``), so it never idles for a round trip.
        self.in_flight: collections.deque[QueuedJob] = collections.deque()
        self.unsent: list[QueuedJob] = []  # a job whose send found the worker gone: it goes back to the queue
        self.ending: Ending | None = None
        self.ended_in: WorkerState | None = None  # its state when it began to end
        self.signalled: int | None = None  # the last signal sent to end it
        self.stopping_since = 0.0
        self.used_before: int | None = None  # device memory used just before it ended, for the reclaim
        self.last_words_until = 0.0  # after its death, read its socket at most until then
        self.returncode: int | None = None
        self.stderr_fd: int | None = proc.stderr.fileno() if proc.stderr is not None else None
        if self.stderr_fd is not None:
            os.set_blocking(self.stderr_fd, False)
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""
        self._budget = StderrBudget(self.started_at)
        self._dropped = 0  # bytes of its stderr not passed on since a line last said so ...
        self._dropping_since = 0.0  # ... counted from then
        self._skip_line = False  # the line under way was cut: drop the rest of it
        self._open_line = False  # what was passed on ends inside a line
        self.pidfd = pidfd  # None: the loop looks for its exit every 50 ms instead

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def mode(self) -> str:
        return self.spec.name

    @property
    def alive(self) -> bool:
        """Not yet reaped (it may be stopping)."""
        return self.state is not WorkerState.EXITED

    def transition(self, new: WorkerState) -> None:
        if self.state not in _PREDECESSORS[new]:
            raise IllegalTransition(f"worker gen {self.gen}: {self.state.value} -> {new.value} is not allowed")
        if log.isEnabledFor(logging.DEBUG):  # twice a job: not even the enum lookups unless asked for
            log.debug("worker gen %d pid %d: %s -> %s", self.gen, self.pid, self.state.value, new.value)
        if new in (WorkerState.STOPPING, WorkerState.EXITED) and self.ended_in is None:
            self.ended_in = self.state
        self.state = new
        if new is WorkerState.READY:
            self.idle_since = self.clock()

    def reap(self) -> bool:
        """Collect its exit status if it has exited (never blocks); True then."""
        if self.returncode is None:
            self.returncode = self.proc.poll()
        return self.returncode is not None

    def pump_stderr(self, budget: int = _READ_PER_TURN) -> None:
        """Read what the worker wrote, pass on what its budget allows, keep
        the tail. Never blocks, and reads at most ``budget`` bytes before
        going back to the poll."""
        now = time.monotonic()
        while self.stderr_fd is not None and budget > 0:
            try:
                chunk = os.read(self.stderr_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:  # EOF: the worker and everything that shared its stderr are gone
                self._close_stderr()
                break
            budget -= len(chunk)
            self._keep_tail(chunk)
            self._pass_on(chunk, now)
        if self._dropped and (self.stderr_fd is None or now - self._dropping_since >= STDERR_REPORT_S):
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
            "dropped %s bytes of the stderr of worker gen %d pid %d in %.1f s: more than the %s KiB a second "
            "(%s KiB at once) passed on from a worker; its last lines are kept for crash reports",
            f"{self._dropped:,}", self.gen, self.pid, now - self._dropping_since,
            f"{STDERR_RATE // 1024:,}", f"{STDERR_BURST // 1024:,}",
        )  # fmt: skip
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

    def stderr_tail(self) -> list[str]:
        partial = self._partial.decode("utf-8", "replace").strip()
        return [*self._tail, *([partial] if partial else [])][-STDERR_TAIL_LINES:]

    def _close_stderr(self) -> None:
        if self.stderr_fd is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.stderr_fd = None

    def close_fds(self) -> None:
        """After the reap: keep the last words, release the descriptors. A
        grandchild may hold the pipe open forever; we do not wait for it."""
        self.pump_stderr(budget=4 * _READ_PER_TURN)
        self._close_stderr()
        if self._dropped:
            self._say_dropped(time.monotonic())
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
