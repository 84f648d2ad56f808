"""The restart budget, after Erlang/OTP's supervisor intensity and period:
at most ``max_restarts`` unexpected deaths (or failed loads) in
``restart_window`` seconds, with a growing wait before each respawn; past
that the supervisor is ``failed`` and respawns nothing until an operator's
``switch_mode()`` or ``restart()`` clears it. A crash loop costs a bounded
number of tries, never a spinning service."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

log = logging.getLogger("gpuvisor")


class RestartBudget:
    def __init__(self, config, clock: Callable[[], float] = time.monotonic):
        self.config = config  # max_restarts, restart_window, restart_backoff, restart_backoff_max
        self.clock = clock
        self._deaths: collections.deque[float] = collections.deque()
        self.respawn_at = 0.0  # no automatic respawn before this
        self.failed: str | None = None  # why the budget ran out

    def count(self, what: str) -> bool:
        """One death; True if it exhausted the budget (``failed`` says why)."""
        now = self.clock()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self.config.restart_window:
            self._deaths.popleft()
        n = len(self._deaths)
        if n > self.config.max_restarts:
            self.failed = (
                f"{n} worker deaths in {self.config.restart_window:g}s (max_restarts={self.config.max_restarts}); "
                f"the last: {what}. switch_mode() or restart() clears this"
            )
            log.error("restart budget exhausted: %s", self.failed)
            return True
        delay = 0.0 if n <= 1 else min(self.config.restart_backoff * 2 ** (n - 2), self.config.restart_backoff_max)
        self.respawn_at = now + delay
        if delay:
            log.warning("respawn %d in this window: waiting %.2fs first", n, delay)
        return False

    def backing_off(self) -> bool:
        return self.clock() < self.respawn_at

    def reset(self) -> None:
        """An operator's word (a switch to a new mode, restart(), leaving
        ``failed``): a fresh budget."""
        if self.failed is not None:
            log.warning("leaving the failed state")
        self.failed = None
        self._deaths.clear()
        self.respawn_at = 0.0
