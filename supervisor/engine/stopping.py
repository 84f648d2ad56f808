"""Shutdown: the drain, its deadline and its progress, the cancel of what
is left, and what the stop did, told to followers.

``begin()`` takes a ``Shutdown`` command: the devices take no spare from
then on; with ``drain`` the queue runs out in order (bounded by the
tightest of the callers' timeouts, the ``DRAIN`` deadline), without it
everything is cancelled and the workers stopped at once. The loop ends
when nothing is left (``Engine.finished``).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

from protocol import GpuvisorError, JobCancelled
from supervisor.engine.commands import QueuedJob, Shutdown
from supervisor.engine.deadlines import Deadline
from supervisor.engine.device_state import Parts

log = logging.getLogger("gpuvisor")


@dataclass
class DrainTally:
    jobs_done: int  # the devices' jobs done when the stop began
    began: float
    cancelled: int = 0
    left: int = -1  # the jobs left when last told


class Stopping:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.command: Shutdown | None = None  # the first shutdown asked for
        self.waiters: list[Future] = []  # every caller's: answered when the loop is over
        self.tally: DrainTally | None = None
        self._key = (Deadline.DRAIN, self)

    def begin(self, command: Shutdown) -> None:
        parts = self.parts
        self.waiters.append(command.future)
        for device in parts.devices:
            device.begin_shutdown()
        if self.command is None:
            self.command, parts.stopping = command, True
            log.info("shutting down (%s)", "drain" if command.drain else "no drain")
            self.tally = DrainTally(sum(d.jobs_done for d in parts.devices), parts.clock())
        if command.drain and command.timeout is not None:  # the tightest of all the callers' bounds
            deadline = parts.clock() + command.timeout
            current = parts.deadlines.get(self._key)
            parts.deadlines.set(self._key, min(deadline, current) if current is not None else deadline)
        if not command.drain:
            parts.deadlines.clear(self._key)
            self.cancel_everything(JobCancelled("cancelled by shutdown(drain=False)"))

    def on_deadline(self, name: Deadline) -> None:
        """The drain ran out of time."""
        self.parts.deadlines.clear(self._key)
        log.warning("shutdown drain ran out of time; cancelling what is left")
        self.cancel_everything(JobCancelled("shutdown's drain timeout passed before this job ran"))

    def cancel_everything(self, error: GpuvisorError) -> None:
        """Fail queued work, the switches under way and the jobs in flight
        with ``error``, and stop the workers."""
        parts, tally = self.parts, self.tally
        for item in parts.queue.take_all():
            if tally is not None and isinstance(item, QueuedJob) and not item.future.done():
                tally.cancelled += 1
            parts.outcomes.add(item.future, error=error)
        for device in parts.devices:
            device.cancel_switch(error)
            cancelled = device.cancel_in_flight(error)
            if tally is not None:
                tally.cancelled += cancelled

    def progress(self, *, again: bool = False) -> None:
        """While stopping: the jobs left, logged and told each time it
        changes (``again``: told now, to a new follower)."""
        tally, parts = self.tally, self.parts
        if tally is None:
            return
        if again:
            tally.left = -1
        in_flight = sum(len(d.worker.in_flight) for d in parts.devices if d.worker is not None)
        left = len(parts.queue) + in_flight
        if left == tally.left:
            return
        if tally.left != -1:
            log.info("draining: jobs left %d (%d queued, %d running)", left, len(parts.queue), in_flight)
        tally.left = left
        command = self.command
        parts.followers.tell(
            "drain",
            jobs_left=left,
            queued=len(parts.queue),
            in_flight=in_flight,
            drain=command is not None and command.drain,
            finished=self.finished_jobs(),
            cancelled=tally.cancelled,
            elapsed=round(parts.clock() - tally.began, 3),
        )

    def finished_jobs(self) -> int:
        tally = self.tally
        return sum(d.jobs_done for d in self.parts.devices) - tally.jobs_done if tally is not None else 0

    def tell_stopped(self) -> None:
        """The loop is over: what the stop did, then every follower's queue is closed."""
        tally, parts = self.tally, self.parts
        finished, cancelled = self.finished_jobs(), tally.cancelled if tally is not None else 0
        seconds = parts.clock() - tally.began if tally is not None else 0.0
        if tally is not None:
            log.info("stopped: jobs finished %d, cancelled %d, in %.2fs", finished, cancelled, seconds)
        parts.followers.tell("stopped", finished=finished, cancelled=cancelled, seconds=round(seconds, 3))
        parts.followers.close()
