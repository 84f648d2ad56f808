"""Who follows the supervisor's events, and the one way an event is told:
nothing at all is built while nobody follows, so the phases cost nothing
then."""

from __future__ import annotations

from typing import Any

from supervisor.events import Subscription, event


class Followers:
    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []  # each a bounded queue
        self.told = 0  # events built for them

    def __bool__(self) -> bool:
        return bool(self.subscriptions)

    def tell(self, name: str, **fields: Any) -> None:
        """An event for whoever follows. A follower that closed its queue is
        forgotten here."""
        subscriptions = self.subscriptions
        if not subscriptions:
            return
        self.told += 1
        told = event(name, **fields)
        for sub in subscriptions:
            sub.put(told)
        if any(sub.closed for sub in subscriptions):
            self.subscriptions = [sub for sub in subscriptions if not sub.closed]

    def only(self, sub: Subscription) -> list[Subscription]:
        """Tell ``sub`` alone from now on (what is under way, to a new
        follower); returns them all, to put back with ``restore``."""
        others, self.subscriptions = self.subscriptions, [sub]
        return others

    def restore(self, others: list[Subscription]) -> None:
        self.subscriptions = others

    def close(self) -> None:
        for sub in self.subscriptions:
            sub.close()
        self.subscriptions = []
