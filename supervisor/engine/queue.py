"""Waiting work: jobs and switch barriers, in the order the loop will take
them. The loop asks ``next()`` for the item to run and ``take()``s it when
it does; how ``next()`` chooses is the queue's ordering policy, the one
thing here that the traffic scheduler replaces.

Today's policy is first in, first out: a switch barrier runs when it
reaches the head, so jobs submitted before a ``switch_mode()`` run in the
old mode and jobs after it in the new one. Cancelled items are dropped as
they surface; an operation that fails a burst of jobs returns the outcomes
instead of settling them, so the loop hands every outcome out in one place.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

from protocol import GpuvisorError
from supervisor.engine.commands import QueuedJob, QueuedSwitch

Item = QueuedJob | QueuedSwitch
Outcome = tuple  # (future, result, error): what the loop hands out


def _cancelled(item: Item) -> bool:
    return item.future is not None and item.future.cancelled()


class JobQueue:
    def __init__(self) -> None:
        self._items: collections.deque[Item] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self._items)

    def append(self, item: Item) -> None:
        self._items.append(item)

    def put_back(self, jobs: list[QueuedJob]) -> None:
        """``jobs`` go back to the head, in their order: a job to retry, or
        jobs a dead worker had not started. They keep their place."""
        self._items.extendleft(reversed(jobs))

    def next(self) -> Item | None:
        """The item the loop should run next (cancelled ones are dropped on
        the way), or None when nothing waits."""
        while self._items and _cancelled(self._items[0]):
            self._items.popleft()
        return self._items[0] if self._items else None

    def take(self, item: Item) -> None:
        """``item``, which ``next()`` gave, leaves the queue."""
        if self._items and self._items[0] is item:
            self._items.popleft()
        else:
            self._items.remove(item)

    def drop_cancelled(self) -> None:
        """Cancelled jobs gave their slots back at once; past ``max_queue``
        they are dropped now rather than when they surface."""
        self._items = collections.deque(item for item in self._items if not _cancelled(item))

    def take_all(self) -> list[Item]:
        items, self._items = list(self._items), collections.deque()
        return items

    def barrier_queued(self) -> bool:
        """An explicit switch or restart waits: jobs behind it belong to what
        it brings, not to the failed state."""
        return any(isinstance(item, QueuedSwitch) and item.future is not None for item in self._items)

    def all_in(self, mode: str) -> bool:
        """Every waiting item runs in ``mode``: a switch to ``mode`` put at the
        tail would change nothing."""
        return all(
            (isinstance(item, QueuedSwitch) and item.mode == mode)
            or (isinstance(item, QueuedJob) and item.mode in (None, mode))
            for item in self._items
        )

    def fail_before_barrier(self, error_for: Callable[[QueuedJob], GpuvisorError | None]) -> list[Outcome]:
        """Remove the jobs ahead of the first switch barrier for which
        ``error_for`` gives an error, and return their outcomes. Jobs behind
        a barrier belong to it and stay."""
        kept: collections.deque[Item] = collections.deque()
        failed: list[Outcome] = []
        barrier = False
        for item in self._items:
            barrier = barrier or isinstance(item, QueuedSwitch)
            error = None if barrier or not isinstance(item, QueuedJob) else error_for(item)
            if error is not None:
                failed.append((item.future, None, error))
            else:
                kept.append(item)
        self._items = kept
        return failed
