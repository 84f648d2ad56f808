"""Streamed jobs as iterators: the chunks a generator handler yields, in
order, then the job's one outcome. Shared by the in-process API and the
daemon client; each feeds a stream from its own I/O thread.

A reader that leaves stops the job. Iterating a stream (``for``, ``async
for``) goes through an iterator of its own, which gives the job up when the
loop is left before the end: by ``break``, by an exception, by a cancelled
task, or by the iterator being closed or dropped. The loop holds that
iterator alone, so CPython ends it the moment the loop is left: ``for``
gets a generator, whose ``finally`` runs when it is closed; ``async for``
gets a small reader whose ``__del__`` does the same (an async generator
would be closed later, by a task the event loop's finalizer schedules,
after a client closed right after the loop had already gone). The stream
itself could not do it: it and its Future refer to each other, and the
supervisor holds the Future while the job lives.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from supervisor.futures import JobFuture

END = object()
"""What ``AsyncJobStream.take()`` gives after the last chunk: the job's
Future is done."""


class JobStream:
    """The chunks of a streamed job, in order, as the handler yields them;
    then the iteration ends, or raises the job's typed error (``WorkerCrashed``
    if the worker died mid-stream, ``JobTimeout``, ``JobFailed`` ...). The
    job still has exactly one outcome: ``future``, whose result is the value
    the handler returned. Chunks wait in memory until read. Leaving a ``for``
    loop over the stream early cancels the job: the worker stops the
    generator at its next chunk."""

    future: JobFuture

    def __init__(self, deliver: Callable[[Any], None] | None = None):
        self._chunks: queue.SimpleQueue = queue.SimpleQueue()
        # ``deliver`` is how a chunk reaches the reader; called on the loop thread.
        self._deliver = deliver or self._chunks.put

    def _feed(self, submit: Callable[[Callable[[Any], None]], JobFuture]) -> JobStream:
        """Post the job with ``submit(sink)``, chunks going to this stream.
        Its chunks may arrive before ``submit`` returns; its end comes after
        them (a job is settled after its last chunk)."""
        self.future = submit(self._on_chunk)
        self.future.add_done_callback(lambda _: self._deliver(END))
        return self

    def _on_chunk(self, value: Any) -> None:
        self._deliver(value)

    def __iter__(self) -> Iterator[Any]:
        ended = False
        try:
            while True:
                item = self._chunks.get()
                if item is END:
                    ended = True
                    self._finish()
                    return
                yield item
        finally:
            if not ended:
                self.close()  # left early: nobody reads the rest

    def __next__(self) -> Any:
        """The next chunk (``next(stream)``); unlike a ``for`` loop, this
        leaves the job alone when the caller stops calling it."""
        item = self._chunks.get()
        if item is END:
            self._finish()
            raise StopIteration
        return item

    def _finish(self) -> None:
        """The stream is over: the job's error is raised, if it has one."""
        self._chunks.put(END)  # iterating again ends again
        error = self.future.exception()  # CancelledError if it was cancelled
        if error is not None:
            raise error

    def result(self, timeout: float | None = None) -> Any:
        """The handler's return value, once every chunk has been produced."""
        return self.future.result(timeout)

    def cancel(self) -> bool:
        """Cancel the job: one still queued never runs; one that runs stops
        at its next chunk (the worker closes its generator). True once
        either is done (``future`` is then cancelled); False if the job has
        ended."""
        return self.future.cancel()

    def close(self) -> None:
        """Stop reading: the job, if it has not ended, is cancelled as by
        ``cancel()``, without waiting for the answer."""
        if not self.future.done():
            self.future.give_up()


class AsyncJobStream(JobStream):
    """``JobStream`` for asyncio: ``async for chunk in stream``; ``await
    stream.result()``. Chunks are handed to the event loop in order. An
    ``async for`` left early, or a reading task that is cancelled, cancels
    the job without blocking the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._queue: asyncio.Queue = asyncio.Queue()

        def deliver(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is left to read
                pass

        super().__init__(deliver)

    def __aiter__(self) -> AsyncIterator[Any]:
        return _AsyncReader(self)

    async def __anext__(self) -> Any:
        try:
            item = await self.take()
        except asyncio.CancelledError:
            self.close()  # the reader gave up
            raise
        if item is END:
            self._end_async()
            raise StopAsyncIteration
        return item

    async def take(self) -> Any:
        """The next chunk, or ``END`` once the job has ended (its outcome is
        then on ``future``). Unlike ``async for``, a cancelled wait leaves
        the job alone: for a reader with its own way of giving it up (the
        HTTP door, which says in its log how the job ended)."""
        return await self._queue.get()

    def _end_async(self) -> None:
        self._queue.put_nowait(END)
        error = self.future.exception()
        if error is not None:
            raise error

    async def result(self, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(asyncio.wrap_future(self.future), timeout)


class _AsyncReader:
    """One ``async for`` over an ``AsyncJobStream``: gives the job up if it
    is dropped (or closed) before the stream's end; see the module
    docstring."""

    def __init__(self, stream: AsyncJobStream):
        self._stream = stream
        self._over = False

    def __aiter__(self) -> _AsyncReader:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._stream.__anext__()  # a cancelled task gives the job up there
        except BaseException:
            self._over = True
            raise

    async def aclose(self) -> None:
        self._leave()

    def __del__(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if not self._over:
            self._over = True
            self._stream.close()
