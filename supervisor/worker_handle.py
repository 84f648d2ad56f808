"""One worker process as the core loop sees it, and its state machine.

::

    SPAWNED --HELLO--> LOADING --READY--> READY <--result-- BUSY
       |                  |                 |  --JOB-->      |
       |                  |                 +--DRAIN--> DRAINING
       +------------------+-----------------+---------------+--> EXITED
                    (exit, kill, load failure, timeout, hang)

Every change goes through ``transition()``, which refuses a change from a
state not listed as its predecessor, so an impossible event (a RESULT while
LOADING) is caught where it happens instead of corrupting the queue.
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import time

from supervisor.config import ModeSpec

log = logging.getLogger("gpuvisor")


class WorkerState(enum.Enum):
    SPAWNED = "spawned"  # process started, no HELLO yet
    LOADING = "loading"  # LOAD sent, waiting for READY
    READY = "ready"  # idle, mode loaded
    BUSY = "busy"  # one job in flight
    DRAINING = "draining"  # DRAIN sent, waiting for exit 0
    EXITED = "exited"  # reaped; the handle is dead


_PREDECESSORS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.LOADING: frozenset({WorkerState.SPAWNED}),
    WorkerState.READY: frozenset({WorkerState.LOADING, WorkerState.BUSY}),
    WorkerState.BUSY: frozenset({WorkerState.READY}),
    WorkerState.DRAINING: frozenset({WorkerState.READY}),
    WorkerState.EXITED: frozenset(set(WorkerState) - {WorkerState.EXITED}),
}


class IllegalTransition(RuntimeError):
    """A bug in the loop: an event arrived that the state machine forbids."""


class WorkerHandle:
    def __init__(self, proc: subprocess.Popen, gen: int, spec: ModeSpec):
        self.proc = proc
        self.gen = gen
        self.spec = spec
        self.identity = f"g{gen}".encode()
        self.state = WorkerState.SPAWNED
        self.started_at = time.monotonic()
        self.last_seen = self.started_at
        self.load_seconds: float | None = None
        self.reported_pid: int | None = None
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # the loop falls back to polling proc.poll()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def mode(self) -> str:
        return self.spec.name

    def transition(self, new: WorkerState) -> None:
        if self.state not in _PREDECESSORS[new]:
            raise IllegalTransition(f"worker gen {self.gen}: {self.state.value} -> {new.value} is not allowed")
        log.debug("worker gen %d pid %d: %s -> %s", self.gen, self.pid, self.state.value, new.value)
        self.state = new

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
