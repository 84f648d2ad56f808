"""What the supervisor tells whoever follows it: switch phases, workers
started and ended, a drain's progress. An event is a small msgpack-safe
map, ``{"event": NAME, "t": wall time, ...fields}`` (docs/protocol.md lists
them).

Each follower has a bounded queue of its own. The loop thread puts events
in and never waits: a follower that does not read loses its oldest events,
and the next read begins with a ``dropped`` event that counts them. A slow
reader costs the loop one append per event and never more memory than its
bound. Shared by the in-process API and the daemon's client: nothing here
knows the engine.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from typing import Any

DEFAULT_BUFFER = 256
"""Events kept for a follower that has not read them; past it the oldest go."""
MAX_BUFFER = 65536

Event = dict[str, Any]


def event(name: str, **fields: Any) -> Event:
    return {"event": name, "t": time.time(), **fields}


class Subscription:
    """One follower's queue. ``put`` on the producing thread, ``take`` on the
    reading one; ``wake``, if given, is called after a put (it must not block:
    it runs on the producer's thread)."""

    def __init__(self, buffer: int = DEFAULT_BUFFER, wake: Callable[[], None] | None = None):
        if type(buffer) is not int or not 1 <= buffer <= MAX_BUFFER:
            raise ValueError(f"buffer must be an int from 1 to {MAX_BUFFER}, got {buffer!r}")
        self._events: collections.deque[Event] = collections.deque()
        self._buffer = buffer
        self._lock = threading.Condition(threading.Lock())
        self.wake = wake
        self.dropped = 0  # since the last take: told to the reader as a ``dropped`` event
        self.dropped_total = 0
        self.closed = False  # no more events will come (the supervisor stopped, or the reader left)

    def put(self, item: Event) -> None:
        with self._lock:
            if self.closed:
                return
            if len(self._events) >= self._buffer:
                self._events.popleft()
                self.dropped += 1
                self.dropped_total += 1
            self._events.append(item)
            self._lock.notify()
        if self.wake is not None:
            self.wake()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()
        if self.wake is not None:
            self.wake()

    def take(self, at_most: int | None = None, timeout: float | None = 0.0) -> list[Event]:
        """Up to ``at_most`` events, oldest first, led by a ``dropped`` event
        if some were lost since the last take. ``timeout``: how long to wait
        for one (None: until one comes or the queue is closed)."""
        with self._lock:
            if not self._events and not self.closed and timeout != 0.0:
                self._lock.wait_for(lambda: self._events or self.closed, timeout)
            taken: list[Event] = []
            if self.dropped and (at_most is None or at_most > 0):
                taken.append(event("dropped", count=self.dropped, total=self.dropped_total))
                self.dropped = 0
            n = len(self._events) if at_most is None else max(0, min(len(self._events), at_most - len(taken)))
            taken.extend(self._events.popleft() for _ in range(n))
            return taken

    @property
    def pending(self) -> int:
        return len(self._events) + (1 if self.dropped else 0)

    @property
    def over(self) -> bool:
        """Closed, and every event read."""
        return self.closed and not self._events and not self.dropped


class EventStream:
    """Events as they come: ``with sup.events() as events: for e in events``.
    Iteration ends when the supervisor stops (or the daemon ends the
    stream); it raises the error that ended it, if one did (the daemon went
    away, say). Leaving the ``with`` block, or ``close()``, stops following."""

    def __init__(self, subscription: Subscription, stop: Callable[[], None] | None = None, ended: Future | None = None):
        """``stop``: tells the producer the reader left (a closed queue is
        forgotten by the producer at its next event anyway); ``ended``: the
        request whose error, if any, ends the stream."""
        self._sub = subscription
        self._stop = stop
        self.ended = ended

    @property
    def subscription(self) -> Subscription:
        return self._sub

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if not self._sub.closed:
            self._sub.close()
            if self._stop is not None:
                self._stop()

    def __iter__(self) -> Iterator[Event]:
        while True:
            item = self.next(timeout=None)
            if item is None:
                return
            yield item

    def next(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (None: until one
        comes); None when the stream is over, or nothing came in time
        (``over`` says which)."""
        taken = self._sub.take(1, timeout)
        if taken:
            return taken[0]
        if self._sub.over:
            self._raise_end()
        return None

    def take(self, at_most: int | None = None) -> list[Event]:
        """The events waiting now (up to ``at_most``), without waiting."""
        return self._sub.take(at_most)

    @property
    def over(self) -> bool:
        return self._sub.over

    def _raise_end(self) -> None:
        ended = self.ended
        if ended is not None and ended.done() and not ended.cancelled():
            error = ended.exception()
            if error is not None:
                raise error


class AsyncEventStream:
    """``EventStream`` for asyncio: ``async with ... as events: async for e
    in events``. Events are handed to the event loop by the thread that
    produced them; a reader waits on the loop, never on a thread."""

    def __init__(self, stream: EventStream, loop: asyncio.AbstractEventLoop):
        self._stream = stream
        subscription = stream.subscription
        self._ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the event loop is closed: nobody is left to read
                pass

        subscription.wake = wake
        self._ready.set()  # events may have come before the wake was in place

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        self._stream.close()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while True:
            self._ready.clear()
            item = self._stream.next(timeout=0.0)
            if item is not None:
                self._ready.set()  # more may wait
                return item
            if self._stream.over:
                raise StopAsyncIteration
            await self._ready.wait()
