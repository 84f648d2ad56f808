"""Jobs of the daemon's one ``Supervisor``, awaited on the HTTP thread's
event loop, and given up when their caller leaves.

The supervisor settles a job's ``concurrent.futures.Future`` on its own loop
thread; this side only waits for it (``asyncio.wrap_future``) or, for a
stream, reads the chunks and the end that an ``AsyncJobStream`` hands to
the event loop in order, with no thread per request. While it waits, it
also listens for the client's disconnect (ASGI's ``http.disconnect``): a
caller that left gets its job cancelled, so a job still queued never runs
and a stream that runs stops at its next chunk (the worker closes its
generator).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from supervisor.api import Supervisor
from supervisor.futures import JobFuture
from supervisor.service.http.clients import client_of
from supervisor.service.http.errors import ApiError, from_job
from supervisor.stream import END, AsyncJobStream
from supervisor.surface import ChunkSink

T = TypeVar("T")
log = logging.getLogger("gpuvisor")


def _give_up(request: Request, future: Future) -> None:
    """Cancel the job of a caller that left, and say so once: an operator
    sees clients giving up. ``cancel()`` waits for the supervisor's word
    (one turn of its loop), so the line says what really happened."""
    running = future.running()
    if future.cancel():
        fate = "its stream was stopped at its next chunk" if running else "its job was cancelled before it ran"
    else:
        fate = "its running job goes on to its end"
    log.info("HTTP client left %s %s before its answer: %s", request.method, request.url.path, fate)


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(awaitable: Awaitable[T], request: Request) -> T:
    """``awaitable``'s value, or ``ClientGone`` (``awaitable`` cancelled) if
    the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # a wrapped Future passes this on: the job, if still queued, never runs
            # A Task (a stream's next chunk) is cancelled only once it has run again: wait for that,
            # or its result would be asked for while it is still pending.
            await asyncio.wait({work})
    if work.cancelled():
        raise ClientGone
    return work.result()


@dataclass(frozen=True)
class Terms:
    """What a job is submitted with besides its task and payload. ``answer``
    turns a job's error into the HTTP answer (a route that lets the caller
    name the task answers an unknown one as the caller's mistake)."""

    mode: str | None
    timeout: float | None
    retries: int = 0
    give_up_after: float | None = None
    answer: Callable[[BaseException], ApiError] = from_job


def submit(
    sup: Supervisor, request: Request, task: str, payload: Any, terms: Terms, on_chunk: ChunkSink | None = None
) -> JobFuture:
    """``sup.submit_for`` the request's client (its token, else its
    connection: its share of the queue), with what it raises at once (a
    payload msgpack cannot carry) as the HTTP answer it maps to."""
    try:
        return sup.submit_for(
            client_of(request.scope),
            task,
            payload,
            mode=terms.mode,
            timeout=terms.timeout,
            retries=terms.retries,
            on_chunk=on_chunk,
            give_up_after=terms.give_up_after,
        )
    except Exception as exc:  # noqa: BLE001 - every refusal has its status
        raise terms.answer(exc) from exc


async def run(sup: Supervisor, request: Request, task: str, payload: Any, terms: Terms) -> Any:
    """The job's result, or its error as an ``ApiError``."""
    future = submit(sup, request, task, payload, terms)
    try:
        return await unless_gone(asyncio.wrap_future(future), request)
    except ClientGone:
        _give_up(request, future)  # now, not when the wrapper's callback gets round to it: the log says which it was
        raise
    except Exception as exc:  # noqa: BLE001 - the job's typed error
        raise terms.answer(exc) from exc


async def read_body(request: Request) -> bytes:
    """The request's body. Read here, not by FastAPI from a declared body
    parameter: FastAPI keeps the bytes and everything parsed from them
    referenced until the route returns, which for a queued job is as long
    as it waits."""
    parts = []
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise ClientGone
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


class Stream:
    """A streamed job's chunks on this event loop (an ``AsyncJobStream``),
    then ``END``. The first item is awaited before the response starts, so
    a job refused before its first chunk (bad input, a full queue, a
    timeout) still gets its own status rather than a 200 with an error
    inside."""

    def __init__(self, sup: Supervisor, request: Request, task: str, payload: Any, terms: Terms):
        self.answer = terms.answer
        self._chunks = AsyncJobStream(asyncio.get_running_loop())
        self._chunks._feed(lambda sink: submit(sup, request, task, payload, terms, on_chunk=sink))
        self.future = self._chunks.future

    async def first(self, request: Request) -> Any:
        try:
            item = await unless_gone(self._chunks.take(), request)
        except ClientGone:
            _give_up(request, self.future)
            raise
        if item is END and self.future.cancelled():
            raise ClientGone
        error = self.future.exception() if item is END else None
        if error is not None:
            raise self.answer(error)
        return item

    async def rest(self, first: Any) -> AsyncIterator[Any]:
        """The chunks from ``first`` on; then ``outcome()`` is the job's."""
        item = first
        while item is not END:
            yield item
            item = await self._chunks.take()

    def outcome(self) -> Any:
        """The ended job's result, or its error as the ``ApiError`` that
        goes in the stream's last event."""
        if self.future.cancelled():
            raise ApiError(503, "the job was cancelled", "job_cancelled")
        error = self.future.exception()
        if error is not None:
            raise self.answer(error)
        return self.future.result()


class JobStreamResponse(StreamingResponse):
    """Server-sent events from a job; however the response ends (finished,
    the client gone, the server stopping), the job is given up if it has
    not ended."""

    def __init__(self, events: AsyncIterator[str | bytes], stream: Stream, request: Request):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream, self.request = stream, request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.stream.future.done():
                _give_up(self.request, self.stream.future)
