"""A job that a daemon runs, as its client holds it: ``cancel()`` is the
daemon's word, and its chunks must come in order (a gap fails it rather
than leave its reader waiting for a chunk that will never come)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from protocol import StreamIncomplete
from supervisor.futures import JobFuture
from supervisor.surface import ChunkSink

if TYPE_CHECKING:
    from supervisor.client.client import Client


class RemoteJobFuture(JobFuture):
    """A job a daemon runs. ``cancel()`` asks the daemon and answers with
    its word: True if the job was still queued there and will never run, or
    is a stream it stopped (the Future is then cancelled, as in-process);
    False for any other job once it runs."""

    def __init__(self, client: Client, on_chunk: ChunkSink | None = None):
        super().__init__(on_chunk)
        self._client = weakref.ref(client)
        self.request_id = 0
        self.chunks = 0  # chunks received: the next must carry seq chunks + 1

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        client = self._client()
        return client is not None and client._cancel(self)

    def give_up(self) -> None:
        """``cancel()`` without waiting for the daemon's answer."""
        client = self._client()
        if not self.done() and client is not None:
            client._cancel(self, wait=False)

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
