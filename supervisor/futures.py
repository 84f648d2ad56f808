"""The Future a caller holds for a job, and the one way it gets its outcome.

``JobFuture`` is a ``concurrent.futures.Future`` that also carries what the
job's owner needs on the way: where its streamed chunks go, the queue slot
it holds (given back exactly once, however the job ends), and how a
streamed job that runs is stopped at its caller's word. The daemon's
client subclasses it so that ``cancel()`` asks the daemon, whose answer is
the truth.

A caller's cancel ends a Future ``cancelled()`` whether the job was queued
or was a stream that ran, in process and through the daemon alike: the
caller asked, so ``CancelledError`` is what it gets, not a job error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, RUNNING
from typing import Any

StopStream = Callable[["JobFuture", bool], bool]
"""Asks the job's owner to stop its stream while it runs: ``(future, wait)``;
with ``wait``, returns whether it was stopped (the Future is then cancelled),
else returns at once."""


class JobFuture(Future):
    def __init__(self, on_chunk: Callable[[Any], None] | None = None, stop_stream: StopStream | None = None):
        super().__init__()
        self.on_chunk = on_chunk  # a streamed job's chunks, in order, before its outcome
        self._stop_stream = stop_stream  # None: a job that cannot be stopped once it runs
        self._release: Callable[[], None] | None = None
        self._release_lock = threading.Lock()

    def cancel(self) -> bool:
        """A queued job: cancelled, it never runs (True). A streamed job
        that runs: the worker is told to stop it at its next chunk, and the
        Future is cancelled (True) once that is decided; its later chunks
        and its own answer are dropped. A job that runs and does not stream
        cannot be stopped (only killing the worker could): False."""
        if super().cancel():
            return True
        if self._stop_stream is None or self.done():
            return self.cancelled()
        return self._stop_stream(self, True)

    def give_up(self) -> None:
        """The reader left: ``cancel()`` without waiting for the answer, so
        that it is safe from anywhere (a finalizer, any thread, an event
        loop that must not block)."""
        if not super().cancel() and self._stop_stream is not None and not self.done():
            self._stop_stream(self, False)

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
    while it waited keeps that outcome; one already done is left alone.
    ``CancelledError`` as the error ends it cancelled, even while it runs
    (a stream stopped at its caller's word)."""
    if isinstance(error, CancelledError):
        _cancel_now(future)
        return
    # A job the loop started is RUNNING already (the usual case: no lock taken twice over).
    if future._state != RUNNING and (future.done() or not future.set_running_or_notify_cancel()):
        return  # over already, or cancelled by its caller while it waited
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # a stream its caller stopped meanwhile keeps that outcome
        pass


def _cancel_now(future: Future) -> None:
    """``future`` cancelled, and everyone waiting on it told. ``Future.cancel``
    refuses a RUNNING Future (an executor cannot stop a call it runs); a
    stream can be stopped, so this makes the same change that ``cancel()``
    and ``set_running_or_notify_cancel()`` make together, from RUNNING."""
    if not future.running():
        if Future.cancel(future) and future._state != CANCELLED_AND_NOTIFIED:
            future.set_running_or_notify_cancel()  # tells concurrent.futures.wait() callers
        return
    with future._condition:
        if future._state != RUNNING:
            return
        future._state = CANCELLED_AND_NOTIFIED
        for waiter in future._waiters:
            waiter.add_cancelled(future)
        future._condition.notify_all()
    future._invoke_callbacks()  # type: ignore[attr-defined]


def gather(parts: list[Future], into: Future, combine: Callable[[list[Any]], Any]) -> None:
    """``into`` gets ``combine(results)`` once every one of ``parts`` is done,
    or the first error among them: one answer for a request the loop
    carries out as several commands (an unload of every device)."""
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        errors = [p.exception() for p in parts if not p.cancelled() and p.exception() is not None]
        if errors:
            settle(into, error=errors[0])
        else:
            settle(into, result=combine([None if p.cancelled() else p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(one_done)
