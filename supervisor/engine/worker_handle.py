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
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protocol import GpuvisorError
from supervisor.config import ModeSpec
from supervisor.engine.commands import QueuedJob
from supervisor.engine.stderr import StderrPipe

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


class WorkerHandle:
    """The loop's view of one worker process: its state, the jobs handed to
    it, how it is ending, its stderr (``engine.stderr``)."""

    def __init__(
        self,
        proc: subprocess.Popen,
        gen: int,
        spec: ModeSpec,
        pidfd: int | None,
        clock: Callable[[], float] = time.monotonic,
    ):
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
        self.stderr = StderrPipe(proc.stderr, f"worker gen {gen} pid {proc.pid}", time.monotonic())
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

    @property
    def stderr_fd(self) -> int | None:
        return self.stderr.fd

    def close_fds(self) -> None:
        """After the reap: the last of its stderr read, the descriptors released."""
        self.stderr.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    # ------------------------------------------------------------ its end

    def end(
        self,
        ending: Ending,
        sig: signal.Signals | None,
        used: Callable[[], int | None],
        signal_group: Callable[[Any, signal.Signals], None],
    ) -> None:
        """Record why it ends (the first reason, unless a stop turns into a
        kill) and send ``sig`` to its group; ``used``: the device's memory
        now, read only when it begins to end."""
        if self.state is WorkerState.EXITED:
            return
        if self.state is not WorkerState.STOPPING:
            self.ending, self.used_before, self.stopping_since = ending, used(), self.clock()
            self.transition(WorkerState.STOPPING)
        elif sig is signal.SIGKILL and self.ending is not None and self.ending.job_error is None:
            self.ending = ending  # a stop turned into a kill: the new reason is the one that matters
        if sig is not None:
            self.signalled = sig
            signal_group(self.proc, sig)

    def running(self) -> list[QueuedJob]:
        """The jobs it has started: the head, or the head's batch."""
        return [job for job in self.in_flight if job.started]
