"""A breaker per mode: after Erlang/OTP's supervisor intensity and period,
at most ``max_restarts`` unexpected deaths or failed loads of one mode in
``restart_window`` seconds, with a growing wait before each respawn; past
that the mode is *broken* on its device, and its jobs fail at once with
``ModeBroken`` instead of costing another load. A crash loop costs a
bounded number of tries, never a spinning service.

Why per mode: one broken model (a loader that raises, a handler that
crashes its worker) must not take the others down with it. Each mode keeps
its own count, so six requests for a broken model spend that model's
budget alone, and every other mode serves on.

A broken mode is tried again by itself ``broken_retry_s`` after it broke
(a circuit breaker's half-open state: the next job for it loads it once
more); each time it breaks again soon after, the wait doubles, up to
``broken_retry_max_s``. A load that gets to READY closes it. With
``broken_retry_s = 0`` it stays broken until an operator's
``switch_mode()`` or ``restart()``, which clear it at any time.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("gpuvisor")


class RestartBudget:
    """One mode's breaker on one device. ``config``: an object with
    ``max_restarts``, ``restart_window``, ``restart_backoff``,
    ``restart_backoff_max``, ``broken_retry_s`` and ``broken_retry_max_s``."""

    def __init__(self, config: Any, clock: Callable[[], float] = time.monotonic, mode: str = ""):
        self.config = config
        self.clock = clock
        self.mode = mode
        self._deaths: collections.deque[float] = collections.deque()
        self.respawn_at = 0.0  # no automatic respawn before this
        self.failed: str | None = None  # why it broke, while it is broken
        self.retry_at: float | None = None  # when it is tried again by itself; None: only an operator's word
        self._trips = 0  # breaks in a row without a quiet window between them: the retry wait doubles each
        self._last_trip = 0.0

    def count(self, what: str) -> bool:
        """One death; True if it broke the mode (``failed`` says why). A
        death while broken and due for a retry (the trial load failed)
        breaks it again at once, with a longer wait."""
        now = self.clock()
        if self._trips and now - self._last_trip > self._retry_wait(self._trips) + self.config.restart_window:
            self._trips = 0  # it served a whole window since it last broke: forgiven
        if self.failed is not None:
            return self._trip(now, f"it failed again when tried: {what}")
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self.config.restart_window:
            self._deaths.popleft()
        n = len(self._deaths)
        if n > self.config.max_restarts:
            return self._trip(
                now,
                f"{n} failure{'s' if n > 1 else ''} in {self.config.restart_window:g}s "
                f"(max_restarts={self.config.max_restarts}); the last: {what}",
            )
        delay = 0.0 if n <= 1 else min(self.config.restart_backoff * 2 ** (n - 2), self.config.restart_backoff_max)
        self.respawn_at = now + delay
        if delay:
            log.warning("respawn %d in this window: waiting %.2fs first", n, delay)
        return False

    def _retry_wait(self, trips: int) -> float:
        first = self.config.broken_retry_s
        return min(first * 2 ** (trips - 1), max(first, self.config.broken_retry_max_s)) if trips else 0.0

    def _trip(self, now: float, reason: str) -> bool:
        self._trips += 1
        self._last_trip = now
        self._deaths.clear()
        wait = self._retry_wait(self._trips)
        self.retry_at = now + wait if wait > 0 else None
        when = f"tried again in {wait:g}s" if wait > 0 else "broken until restart() or switch_mode()"
        self.failed = f"{reason}; {when}"
        log.error("mode %r is broken: %s", self.mode, self.failed)
        return True

    def broken(self) -> bool:
        """Its jobs fail at once: broken, and not yet due for a retry."""
        return self.failed is not None and (self.retry_at is None or self.clock() < self.retry_at)

    def retry_in(self) -> float | None:
        """Seconds until it is tried again by itself; None: never by itself."""
        return None if self.retry_at is None else max(0.0, self.retry_at - self.clock())

    def backing_off(self) -> bool:
        return self.clock() < self.respawn_at

    def served(self) -> None:
        """A load got to READY: a broken mode that was tried again works."""
        if self.failed is not None:
            log.warning("mode %r loaded again: no longer broken", self.mode)
            self.failed, self.retry_at = None, None

    def reset(self) -> None:
        """An operator's word (``restart()``, an explicit ``switch_mode()``):
        a fresh budget, tried now."""
        if self.failed is not None:
            log.warning("mode %r: no longer broken (an operator's switch or restart)", self.mode)
        self.failed, self.retry_at = None, None
        self._deaths.clear()
        self._trips = 0
        self.respawn_at = 0.0


class Breakers:
    """One device's breakers, a ``RestartBudget`` per mode, made on first use."""

    def __init__(self, config: Any, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._by_mode: dict[str, RestartBudget] = {}

    def of(self, mode: str) -> RestartBudget:
        budget = self._by_mode.get(mode)
        if budget is None:
            budget = self._by_mode[mode] = RestartBudget(self.config, self.clock, mode)
        return budget

    def broken(self, mode: str | None) -> bool:
        """``mode``'s jobs fail at once on this device."""
        budget = self._by_mode.get(mode) if mode is not None else None
        return budget is not None and budget.broken()

    def tripped(self) -> Iterator[RestartBudget]:
        """The breakers that are broken now, due for a retry or not."""
        return (b for b in self._by_mode.values() if b.failed is not None)
