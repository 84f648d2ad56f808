"""The one API gpuvisor offers, declared once, in a sync face and an async
face. ``Supervisor`` (in this process) and ``Client`` (to a daemon) inherit
the sync face; ``AsyncSupervisor`` and ``AsyncClient`` the async one. Being
their base, each face is what the type checker holds the classes to: a
method missing or with another signature is an error before anything runs.

``submit`` is written here, once for each face: its arguments are checked
the same way on every side, and each sync class adds only how it queues a
checked job (``_queue_job``). The async face is the sync one awaited, so it
is written here whole, over the sync class it holds.

How errors arrive is the same on every face, so code written against a face
runs against either side of it:

* a mistake in the arguments themselves (a type, a range, a payload msgpack
  cannot carry) is raised by the call, before anything is queued or sent;
  every face can see it, from the arguments alone;
* what depends on the supervisor's configuration or state (an unknown mode,
  a wrong device, a full queue, a supervisor shutting down) and everything
  the job does arrives through the Future (or a stream's end): a client can
  only learn it from the daemon, so the in-process faces wait for it too;
* a call that answers with a plain value (``status``, ``modes``,
  ``metrics``, ``shutdown``) raises what stops it from answering.

An async call raises both kinds at its ``await``; a stream, at its end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Literal, Protocol, TypeVar, overload, runtime_checkable

from supervisor.arguments import check_submit
from supervisor.events import DEFAULT_BUFFER, AsyncEventStream, EventStream
from supervisor.futures import JobFuture
from supervisor.status import Status, SwitchResult
from supervisor.stream import AsyncJobStream, JobStream

ChunkSink = Callable[[Any], None]
T = TypeVar("T")


@runtime_checkable
class SupervisorAPI(Protocol):
    @overload
    def submit(
        self,
        task: str,
        payload: Any = ...,
        *,
        mode: str | None = ...,
        timeout: float | None = ...,
        retries: int = ...,
        stream: Literal[False] = ...,
        on_chunk: ChunkSink | None = ...,
    ) -> JobFuture: ...

    @overload
    def submit(
        self,
        task: str,
        payload: Any = ...,
        *,
        mode: str | None = ...,
        timeout: float | None = ...,
        retries: int = ...,
        stream: Literal[True],
        on_chunk: None = ...,
    ) -> JobStream: ...

    def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        stream: bool = False,
        on_chunk: ChunkSink | None = None,
    ) -> JobFuture | JobStream:
        """Queue ``task`` with ``payload``; the Future gets the handler's
        result or a typed error. ``mode`` switches first when another is
        loaded. ``stream=True`` returns a ``JobStream`` instead: an iterator
        of the chunks a generator handler yields, then its typed outcome.
        numpy arrays and CPU tensors in ``payload`` travel as raw frames
        without a copy, so do not change them until the job is done.
        ``on_chunk`` instead of ``stream=True``: a Future, and each chunk
        passed to ``on_chunk`` on the supervisor's loop thread or the
        client's I/O thread (it must not block). ``timeout`` is seconds of
        running time in the worker; past it the worker is killed and the job
        fails with ``JobTimeout``; 0 means no timeout, even where the config
        sets a default ``job_timeout``. ``retries`` is the caller's word that
        the job is idempotent: if the worker dies (or hangs) under it, it
        runs again, up to that many times, before it fails with
        ``WorkerCrashed``.

        Bad arguments raise here; a full queue (``QueueFull``: ``max_queue``
        jobs waiting or running, or their payloads holding
        ``max_queue_bytes``), an unknown mode or a supervisor shutting down
        fail the Future. ``Future.cancel()`` succeeds while the job is
        queued, and for a streamed job while it runs too (the worker stops
        it at its next chunk); it returns False for any other job once it
        runs. Either way a cancelled Future raises ``CancelledError``."""
        seconds = check_submit(task, mode, timeout, retries, stream, on_chunk)
        if not stream:
            return self._queue_job(task, payload, mode, seconds, retries, on_chunk)
        return JobStream()._feed(lambda sink: self._queue_job(task, payload, mode, seconds, retries, sink))

    def _queue_job(
        self,
        task: str,
        payload: Any,
        mode: str | None,
        timeout: float | None,
        retries: int,
        on_chunk: ChunkSink | None,
    ) -> JobFuture:
        """What each sync class adds to ``submit``: a job whose arguments
        passed the checks, queued here or sent to the daemon; with
        ``on_chunk``, a streamed one."""
        ...

    def switch_mode(self, mode: str, *, device: str | None = None) -> Future[SwitchResult]:
        """After every job queued before it: ``mode`` loaded (a no-op if it
        is), on ``device`` when it names one of several."""
        ...

    def restart(self, mode: str | None = None, *, device: str | None = None) -> Future[SwitchResult]:
        """After every job queued before it: a fresh worker; clears ``failed``."""
        ...

    def unload(self, device: str | None = None) -> Future[dict[str, Any]]:
        """Free ``device`` (None: all) once its jobs in flight are done; the
        mode stays in force and the next job that needs it loads it again."""
        ...

    def status(self) -> Status: ...

    def modes(self) -> dict[str, dict[str, Any]]:
        """Each configured mode: its loader, whether it is loaded, and its
        tasks (known once it has loaded)."""
        ...

    def metrics(self) -> str:
        """The Prometheus text exposition of the supervisor's metrics."""
        ...

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop, after running what is queued (``drain``, bounded by
        ``timeout``), and return once the worker is gone."""
        ...

    def events(self, *, buffer: int = DEFAULT_BUFFER) -> EventStream:
        """Follow switch phases, workers and drains as they happen, until the
        stream is closed or the supervisor stops; a reader ``buffer`` events
        behind loses the oldest, and is told."""
        ...


@runtime_checkable
class AsyncSupervisorAPI(Protocol):
    """The sync face, awaited: each call is the sync class's, its Future
    handed to this event loop by the thread that settles it (no thread of
    its own in between). Cancelling the awaiting task cancels a job still
    queued, and stops a streamed one that runs."""

    _sync: SupervisorAPI

    @overload
    async def submit(
        self,
        task: str,
        payload: Any = ...,
        *,
        mode: str | None = ...,
        timeout: float | None = ...,
        retries: int = ...,
        stream: Literal[False] = ...,
        on_chunk: ChunkSink | None = ...,
    ) -> Any: ...

    @overload
    async def submit(
        self,
        task: str,
        payload: Any = ...,
        *,
        mode: str | None = ...,
        timeout: float | None = ...,
        retries: int = ...,
        stream: Literal[True],
        on_chunk: None = ...,
    ) -> AsyncJobStream: ...

    async def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        stream: bool = False,
        on_chunk: ChunkSink | None = None,
    ) -> Any:
        """The handler's result; with ``stream=True`` an ``AsyncJobStream``
        (``async for chunk in await sup.submit(..., stream=True)``)."""
        if not stream:
            job = self._sync.submit(task, payload, mode=mode, timeout=timeout, retries=retries, on_chunk=on_chunk)
            return await asyncio.wrap_future(job)
        check_submit(task, mode, timeout, retries, stream, on_chunk)
        job_stream = AsyncJobStream(asyncio.get_running_loop())
        return job_stream._feed(
            lambda sink: self._sync.submit(task, payload, mode=mode, timeout=timeout, retries=retries, on_chunk=sink)
        )

    async def switch_mode(self, mode: str, *, device: str | None = None) -> SwitchResult:
        return await asyncio.wrap_future(self._sync.switch_mode(mode, device=device))

    async def restart(self, mode: str | None = None, *, device: str | None = None) -> SwitchResult:
        return await asyncio.wrap_future(self._sync.restart(mode, device=device))

    async def unload(self, device: str | None = None) -> dict[str, Any]:
        return await asyncio.wrap_future(self._sync.unload(device))

    async def status(self) -> Status:
        return await self._ask(self._sync.status)

    async def modes(self) -> dict[str, dict[str, Any]]:
        return await self._ask(self._sync.modes)

    async def metrics(self) -> str:
        return await self._ask(self._sync.metrics)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._sync.shutdown, drain, timeout)

    def events(self, *, buffer: int = DEFAULT_BUFFER) -> AsyncEventStream:
        """``events()`` for asyncio: ``async with sup.events() as events:
        async for event in events``."""
        return AsyncEventStream(self._sync.events(buffer=buffer), asyncio.get_running_loop())

    async def _ask(self, call: Callable[[], T]) -> T:
        """A plain answer of the sync class, waited for in the loop's
        executor: a client's waits for the daemon's reply, and the event
        loop must not block meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(None, call)
