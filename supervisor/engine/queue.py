"""Waiting work: jobs and switch barriers, and the order the loop takes them.

The queue is cut into segments by explicit switches: a ``switch_mode()``
is a barrier, so every job submitted before it runs before it, in the old
mode, and every job after it, after. Inside the head segment the policy
groups jobs by mode, because a switch costs seconds and a job milliseconds:

* jobs for the loaded mode go first;
* another mode gets its turn when nothing waits for the loaded one, or when
  its oldest job has waited ``max_wait_s`` (the starvation bound, per mode),
  counted from when that job came or when the loaded mode's turn began (its
  first job after its switch), whichever is later: a mode that gets its turn
  runs at least one job and keeps the worker that long while it has work, so
  waiting modes never take the worker from each other before either runs;
* modes waiting take their turn oldest-first;
* inside one mode, jobs keep the order they came in, so each caller's jobs
  for a mode run in the order it submitted them.

A job that names no mode is given one when it is queued: the mode that
would be in force if everything queued before it ran in order (the last
mode a queued job or switch names, else the mode in force). So it runs in
the mode its caller saw, however the policy reorders the rest.

The loop asks ``next()`` for the item to run and ``take()``s it when it
does. Cancelled jobs are dropped as they surface; an operation that fails a
burst of jobs returns the outcomes instead of settling them, so the loop
hands every outcome out in one place.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from protocol import GpuvisorError
from supervisor.engine.commands import QueuedJob, QueuedSwitch

Item = QueuedJob | QueuedSwitch
Outcome = tuple[Any, Any, Any]  # (future, result, error): what the loop hands out


def _cancelled(item: Item) -> bool:
    return item.future is not None and item.future.cancelled()


@dataclass(eq=False)
class _Segment:
    """The jobs between one barrier and the next, by mode, each mode in the
    order its jobs came. ``barrier`` opens the segment and runs before them;
    None once taken (or for the first segment)."""

    barrier: QueuedSwitch | None = None
    modes: dict[str | None, collections.deque[QueuedJob]] = field(default_factory=dict)
    jobs: int = 0

    def add(self, job: QueuedJob, front: bool = False) -> None:
        line = self.modes.setdefault(job.mode, collections.deque())
        if front:
            line.appendleft(job)
        else:
            line.append(job)
        self.jobs += 1

    def heads(self) -> dict[str | None, QueuedJob]:
        """The oldest live job of each mode (cancelled ones are dropped)."""
        out = {}
        for mode, line in list(self.modes.items()):
            while line and line[0].future.cancelled():
                line.popleft()
                self.jobs -= 1
            if line:
                out[mode] = line[0]
            else:
                del self.modes[mode]
        return out


class JobQueue:
    def __init__(
        self, max_wait: Callable[[str], float] = lambda mode: 0.0, clock: Callable[[], float] = time.monotonic
    ):
        """``max_wait(mode)``: the starvation bound of ``mode``'s jobs, in
        seconds (0: no grouping, first in first out between modes)."""
        self.max_wait = max_wait
        self.clock = clock
        self._segments: collections.deque[_Segment] = collections.deque([_Segment()])
        self._tail_mode: str | None = None  # the mode the last queued job or switch named

    def __len__(self) -> int:
        return sum(s.jobs + (s.barrier is not None) for s in self._segments)

    def __bool__(self) -> bool:
        return any(s.jobs or s.barrier is not None for s in self._segments)

    def __iter__(self) -> Iterator[Item]:
        for segment in self._segments:
            if segment.barrier is not None:
                yield segment.barrier
            for line in segment.modes.values():
                yield from line

    # ------------------------------------------------------------ in

    def append(self, item: Item, mode_in_force: str | None = None) -> None:
        """Queue ``item``. A job that names no mode gets one now (see the
        module's docstring); ``mode_in_force`` is the loop's, for when
        nothing queued names one."""
        if isinstance(item, QueuedSwitch):
            if not self:
                self._tail_mode = mode_in_force
            self._segments.append(_Segment(barrier=item))
            if item.mode is not None:
                self._tail_mode = item.mode
            return
        if not self:  # nothing queued: the mode in force is what the loop says
            self._tail_mode = mode_in_force
        if item.mode is None:
            item.mode = self._tail_mode
        else:
            self._tail_mode = item.mode
        item.queued_at = self.clock()
        self._segments[-1].add(item)

    def put_back(self, jobs: list[QueuedJob]) -> None:
        """``jobs`` go back to the head, in their order and with their age: a
        job to retry, or jobs a dead worker had not started."""
        if jobs and self._segments[0].barrier is not None:
            self._segments.appendleft(_Segment())  # they came before the switch waiting at the head
        for job in reversed(jobs):
            self._segments[0].add(job, front=True)

    # ------------------------------------------------------------ out

    def next(
        self, loaded: str | None, turn_since: float = 0.0, eligible: Callable[[str | None], bool] | None = None
    ) -> Item | None:
        """The item a device should run next, with ``loaded`` its mode in
        force since ``turn_since``, among the modes it is ``eligible`` for
        (all, by default); None when nothing waits that it may run. Jobs of
        the head segment it may not run hold back what is behind a barrier,
        as for a device that has only one job to do."""
        while True:
            head = self._segments[0]
            if head.barrier is not None:
                if not _cancelled(head.barrier):
                    return head.barrier
                head.barrier = None
            heads = head.heads()
            if heads:
                if eligible is not None:
                    heads = {m: j for m, j in heads.items() if m is None or eligible(m)}
                return self._choose(heads, loaded, turn_since) if heads else None
            if len(self._segments) == 1:
                return None
            self._segments.popleft()

    def _choose(self, heads: dict[str | None, QueuedJob], loaded: str | None, turn_since: float) -> QueuedJob:
        if None in heads:  # no mode at all: it fails at once, it need not wait
            return heads[None]
        now = self.clock()
        starving = [
            j for m, j in heads.items() if m != loaded and now - max(j.queued_at, turn_since) >= self.max_wait(m or "")
        ]
        if starving:
            return min(starving, key=lambda j: j.queued_at)
        if loaded in heads:
            return heads[loaded]
        return min(heads.values(), key=lambda j: j.queued_at)

    def take(self, item: Item) -> None:
        """``item``, which ``next()`` or ``run_of()`` gave, leaves the queue
        (cancelled jobs ahead of it in its mode go too)."""
        head = self._segments[0]
        if isinstance(item, QueuedSwitch):
            if head.barrier is not item:
                raise ValueError("take() a switch that is not at the head")
            head.barrier = None
            return
        line = head.modes[item.mode]
        while line and line[0] is not item and line[0].future.cancelled():
            line.popleft()
            head.jobs -= 1
        if not line or line[0] is not item:
            raise ValueError("take() a job that is not the oldest of its mode")
        line.popleft()
        head.jobs -= 1

    def run_of(self, job: QueuedJob, task: str, limit: int, max_frames: int) -> list[QueuedJob]:
        """``job`` and the jobs right behind it in its mode for the same
        ``task``, at most ``limit`` of them and ``max_frames`` frames: what one
        batch may take without running any job of that mode ahead of one
        submitted before it. Cancelled jobs on the way are dropped."""
        line = self._segments[0].modes.get(job.mode, collections.deque())
        run: list[QueuedJob] = []
        frames = 0
        while line and line[0] is not job and line[0].future.cancelled():
            line.popleft()
            self._segments[0].jobs -= 1
        for candidate in line:
            if candidate.future.cancelled():
                continue
            frames += len(candidate.frames)
            if len(run) == limit or candidate.task != task or candidate.on_chunk is not None or frames > max_frames:
                break
            run.append(candidate)
        return run or [job]

    def take_all(self) -> list[Item]:
        items = list(self)
        self._segments = collections.deque([_Segment()])
        return items

    # ------------------------------------------------------------ looks

    def barrier_queued(self) -> bool:
        """An explicit switch or restart waits: jobs behind it belong to what
        it brings, not to the failed state."""
        return any(s.barrier is not None and s.barrier.future is not None for s in self._segments)

    def all_in(self, mode: str) -> bool:
        """Every waiting item runs in ``mode``: a switch to ``mode`` put at the
        tail would change nothing."""
        return all(
            (isinstance(item, QueuedSwitch) and item.mode == mode)
            or (isinstance(item, QueuedJob) and item.mode in (None, mode))
            for item in self
        )

    def modes_ahead(self) -> Iterator[str]:
        """The modes jobs wait for before the first barrier, and the
        barrier's: the switches that may come next. Cheap: a few keys."""
        head = self._segments[0]
        for mode, line in head.modes.items():
            if line and mode is not None:
                yield mode
        if len(self._segments) > 1 and (barrier := self._segments[1].barrier) is not None and barrier.mode:
            yield barrier.mode

    def waiting(self) -> dict[str, dict[str, float]]:
        """Per mode: how many jobs wait and how long the oldest has."""
        now = self.clock()
        out: dict[str, dict[str, float]] = {}
        for segment in self._segments:
            for mode, line in segment.modes.items():
                if not line:
                    continue
                entry = out.setdefault(str(mode), {"jobs": 0, "oldest_s": 0.0})
                entry["jobs"] += len(line)
                entry["oldest_s"] = max(entry["oldest_s"], round(now - line[0].queued_at, 3))
        return out

    # ------------------------------------------------------------ failing

    def drop_cancelled(self) -> None:
        """Cancelled jobs gave their places back at once; past ``max_queue``
        they are dropped now rather than when they surface."""
        for segment in self._segments:
            for mode, line in list(segment.modes.items()):
                kept = collections.deque(job for job in line if not job.future.cancelled())
                segment.jobs -= len(line) - len(kept)
                segment.modes[mode] = kept

    def fail_before_barrier(self, error_for: Callable[[QueuedJob], GpuvisorError | None]) -> list[Outcome]:
        """Remove the jobs ahead of the first switch barrier for which
        ``error_for`` gives an error, and return their outcomes. Jobs behind
        a barrier belong to it and stay."""
        head = self._segments[0]
        if head.barrier is not None:
            return []
        failed: list[Outcome] = []
        for mode, line in list(head.modes.items()):
            kept: collections.deque[QueuedJob] = collections.deque()
            for job in line:
                error = error_for(job)
                if error is not None:
                    failed.append((job.future, None, error))
                else:
                    kept.append(job)
            head.jobs -= len(line) - len(kept)
            head.modes[mode] = kept
        return failed
