"""A job that a daemon runs, as its client holds it: ``cancel()`` is the
daemon's word, and its chunks must come in order (a gap fails it rather
than leave its reader waiting for a chunk that will never come)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from protocol import StreamIncomplete
from supervisor.futures import JobFuture
from supervisor.surface import ChunkSink

AskToCancel = Callable[["RemoteJobFuture", bool], bool]
"""The client's request to the daemon to cancel a job: ``(future, wait)``."""


class RemoteJobFuture(JobFuture):
    """A job a daemon runs. ``cancel()`` asks the daemon and answers with
    its word: True if the job was still queued there and will never run, or
    is a stream it stopped (the Future is then cancelled, as in-process);
    False for any other job once it runs."""

    def __init__(self, ask_to_cancel: AskToCancel, on_chunk: ChunkSink | None = None):
        """``ask_to_cancel``: a bound method of the client, held weakly (a
        Future kept after its client is gone must not keep it open)."""
        super().__init__(on_chunk)
        self._ask_to_cancel = weakref.WeakMethod(ask_to_cancel)
        self.request_id = 0
        self.chunks = 0  # chunks received: the next must carry seq chunks + 1

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        ask = self._ask_to_cancel()
        return ask is not None and ask(self, True)

    def give_up(self) -> None:
        """``cancel()`` without waiting for the daemon's answer."""
        ask = self._ask_to_cancel()
        if not self.done() and ask is not None:
            ask(self, False)

    def take_chunk(self, seq: int, value: Any) -> StreamIncomplete | None:
        """Hand the chunk numbered ``seq`` to its reader, or the error that
        ends the stream when it is not the next one."""
        expected = self.chunks + 1
        if seq != expected:
            lost = f"{seq - expected:,} lost" if seq > expected else "out of order"
            gap = f"request {self.request_id}: chunk {seq} came after chunk {expected - 1} ({lost})"
            return StreamIncomplete(f"{gap}; the stream is incomplete")
        self.chunks = expected
        if self.on_chunk is not None:
            self.on_chunk(value)
        return None
