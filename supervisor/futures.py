"""The Future a caller holds for a job, and the one way it gets its outcome.

``JobFuture`` is a ``concurrent.futures.Future`` that also carries what the
job's owner needs on the way: where its streamed chunks go and the queue
slot it holds (given back exactly once, however the job ends). These used
to be attributes patched onto plain Futures; a subclass says what a job's
Future is. The daemon's client subclasses it so that ``cancel()`` asks the
daemon, whose answer is the truth.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class JobFuture(Future):
    def __init__(self, on_chunk: Callable[[Any], None] | None = None):
        super().__init__()
        self.on_chunk = on_chunk  # a streamed job's chunks, in order, before its outcome
        self._release: Callable[[], None] | None = None
        self._release_lock = threading.Lock()

    def hold_slot(self, release: Callable[[], None]) -> None:
        """``release`` gives the job's queue slot back: called once, when the
        job ends, whatever way it ends."""
        self._release = release
        self.add_done_callback(lambda f: f.release_slot())  # type: ignore[attr-defined]  # f is self

    def release_slot(self) -> None:
        with self._release_lock:
            release, self._release = self._release, None
        if release is not None:
            release()


def settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its one outcome, now. A Future the caller cancelled
    while it waited keeps that outcome; one already done is left alone."""
    if not future.done() and not future.running():
        if not future.set_running_or_notify_cancel():
            return
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
