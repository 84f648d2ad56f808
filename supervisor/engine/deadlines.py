"""The loop's deadlines, in one table: what is due now, and when the next
one comes, are read from the same entries, so the two can never disagree.

Each deadline is named by a ``Deadline`` and the part that acts on it
when it fires (a device, or the shutdown's stop): ``(Deadline.JOB,
device)``. Setting a name again moves it, and an action that has fired
clears its own entry. The table holds times, not actions: the owner
decides what each name means, so every action runs in one place.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any


class Deadline(enum.StrEnum):
    HEARTBEAT = "heartbeat"  # no message from the worker for heartbeat_timeout: it hangs
    LOAD = "load"  # the worker has not said READY within load_timeout
    JOB = "job"  # the running job's timeout (the earliest of a running batch's)
    BATCH = "batch"  # a short batch has waited max_delay_ms for more jobs: it goes as it is
    STOP = "stop"  # a worker asked to stop (SIGTERM) is killed (SIGKILL) if still there
    EXIT = "exit"  # a worker sent DRAIN must have exited by now
    LAST_WORDS = "last_words"  # a dead worker's socket has been quiet long enough to judge its jobs
    RESPAWN = "respawn"  # the restart backoff has passed
    IDLE_UNLOAD = "idle_unload"  # an idle worker is stopped (idle_unload_s)
    RECLAIM = "reclaim"  # read NVML again while a switch waits for memory to come back
    DRAIN = "drain"  # the shutdown's drain budget: what is left is cancelled
    STANDBY_REAP = "standby_reap"  # look again for stopped standbys to reap
    STANDBY_PACE = "standby_pace"  # the spare may go on importing: the worker has been idle long enough

    # Hashed at C speed: the loop sets a dozen deadlines a turn, and Enum's
    # own __hash__ is Python code. Equal to its value, so hashed like it.
    __hash__ = str.__hash__


Key = Any
"""A deadline's name, any hashable; in the engine ``(Deadline, owner)``, the
owner having ``on_deadline(Deadline)``."""


class Deadlines:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._at: dict[Key, float] = {}

    def set(self, name: Key, when: float | None) -> None:
        """Due at ``when`` (a ``clock()`` time); None clears it."""
        if when is None:
            self._at.pop(name, None)
        else:
            self._at[name] = when

    def after(self, name: Key, seconds: float) -> None:
        self._at[name] = self.clock() + seconds

    def clear(self, name: Key) -> None:
        self._at.pop(name, None)

    def get(self, name: Key) -> float | None:
        return self._at.get(name)

    def __contains__(self, name: Key) -> bool:
        return name in self._at

    def next(self) -> float | None:
        """The earliest deadline, or None when nothing is due ever."""
        return min(self._at.values(), default=None)

    def wait(self, longest: float) -> float:
        """Seconds a poll may wait: until the next deadline, at most ``longest``."""
        soonest = self.next()
        if soonest is None:
            return longest
        return max(0.0, min(longest, soonest - self.clock()))

    def due(self) -> list[Key]:
        """The names whose time has come, earliest first. They stay set: the
        action for each clears or moves it."""
        now = self.clock()
        at = self._at
        if not at or min(at.values()) > now:  # most turns: nothing due, nothing to sort
            return []
        return [name for name, when in sorted(at.items(), key=lambda item: item[1]) if when <= now]
