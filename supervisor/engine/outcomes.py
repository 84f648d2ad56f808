"""Outcomes decided during a turn, handed out after the turn's status is
published: when a caller sees its Future done, ``status()`` already tells
the same story. Some wait longer, held under what they wait for (a
worker's end, the spares being reaped) until the loop releases them.
"""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

from supervisor.futures import settle

Outcome = tuple[Future, Any, BaseException | None]

SPARES_REAPED = "spares reaped"
"""What a reload's answer waits for: the spares it stopped are gone."""


def worker_gone(gen: int) -> tuple[str, int]:
    """What an outcome waits for when it must follow worker ``gen``'s end."""
    return ("worker gone", gen)


class Outcomes:
    def __init__(self) -> None:
        self._due: list[Outcome] = []
        self._held: dict[Hashable, list[Outcome]] = {}

    def add(self, future: Future | None, *, result: Any = None, error: BaseException | None = None) -> None:
        """``future``'s outcome, handed out at the end of this turn."""
        if future is not None:
            self._due.append((future, result, error))

    def extend(self, outcomes: list[Outcome]) -> None:
        self._due.extend(outcomes)

    def hold(self, until: Hashable, future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
        """``future``'s outcome, handed out in the turn ``until`` is released."""
        self._held.setdefault(until, []).append((future, result, error))

    def release(self, until: Hashable) -> None:
        self._due.extend(self._held.pop(until, ()))

    def holding(self, until: Hashable) -> bool:
        return until in self._held

    def hand_out(self) -> None:
        outcomes, self._due = self._due, []
        for n, (future, result, error) in enumerate(outcomes):
            try:
                # The caller's place in the queue first: a caller woken by the
                # result may submit again at once, and must find its place free.
                release = getattr(future, "release_slot", None)
                if release is not None:
                    release()
                settle(future, result=result, error=error)
            except BaseException:
                self._due[:0] = outcomes[n + 1 :]  # a callback raised past Future's guard: keep the rest
                raise
