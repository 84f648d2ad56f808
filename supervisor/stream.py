"""Streamed jobs as iterators: the chunks a generator handler yields, in
order, then the job's one outcome. Shared by the in-process API and the
daemon client; each feeds a stream from its own I/O thread."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

_END = object()  # after a stream's last chunk: its Future is done


class JobStream:
    """The chunks of a streamed job, in order, as the handler yields them;
    then the iteration ends, or raises the job's typed error (``WorkerCrashed``
    if the worker died mid-stream, ``JobTimeout``, ``JobFailed`` ...). The
    job still has exactly one outcome: ``future``, whose result is the value
    the handler returned. Chunks wait in memory until read; leaving the loop
    early does not stop the job."""

    future: Future

    def __init__(self, deliver: Callable[[Any], None] | None = None):
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        # ``deliver`` is how a chunk reaches the reader; called on the loop thread.
        self._deliver = deliver or self._chunks.put

    def _feed(self, submit: Callable[[Callable[[Any], None]], Future]) -> JobStream:
        """Post the job with ``submit(sink)``, chunks going to this stream.
        Its chunks may arrive before ``submit`` returns; its end comes after
        them (a job is settled after its last chunk)."""
        self.future = submit(self._on_chunk)
        self.future.add_done_callback(lambda _: self._deliver(_END))
        return self

    def _on_chunk(self, value: Any) -> None:
        self._deliver(value)

    def __iter__(self) -> JobStream:
        return self

    def __next__(self) -> Any:
        item = self._chunks.get()
        if item is _END:
            self._chunks.put(_END)  # iterating again ends again
            error = self.future.exception()  # CancelledError if it was cancelled
            if error is not None:
                raise error
            raise StopIteration
        return item

    def result(self, timeout: float | None = None) -> Any:
        """The handler's return value, once every chunk has been produced."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the job if it has not started (like ``Future.cancel``)."""
        return self.future.cancel()


class AsyncJobStream(JobStream):
    """``JobStream`` for asyncio: ``async for chunk in stream``; ``await
    stream.result()``. Chunks are handed to the event loop in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._queue: asyncio.Queue = asyncio.Queue()

        def deliver(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is left to read
                pass

        super().__init__(deliver)

    def __aiter__(self) -> AsyncJobStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.future.cancel()  # the reader gave up: a job still queued need not run
            raise
        if item is _END:
            self._queue.put_nowait(_END)
            error = self.future.exception()
            if error is not None:
                raise error
            raise StopAsyncIteration
        return item

    async def result(self, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self.future), timeout)
