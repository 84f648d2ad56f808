"""The one API gpuvisor offers, declared once, in a sync face and an async
face. ``Supervisor`` (in this process) and ``Client`` (to a daemon) keep
the sync face; ``AsyncSupervisor`` and ``AsyncClient`` the async one. Code
written against a face runs against either side of it, and a test holds
the four classes to these signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from supervisor.futures import JobFuture
from supervisor.status import Status, SwitchResult
from supervisor.stream import AsyncJobStream, JobStream

ChunkSink = Callable[[Any], None]


@runtime_checkable
class SupervisorAPI(Protocol):
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
        """Queue ``task``; the Future gets the handler's result or a typed
        error. ``stream=True``: a ``JobStream`` of its chunks instead.
        ``on_chunk``: a Future, and each chunk passed to it as it comes.
        ``future.cancel()`` is True only if the job will never run."""
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


@runtime_checkable
class AsyncSupervisorAPI(Protocol):
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
    ) -> Any | AsyncJobStream: ...

    async def switch_mode(self, mode: str, *, device: str | None = None) -> SwitchResult: ...

    async def restart(self, mode: str | None = None, *, device: str | None = None) -> SwitchResult: ...

    async def unload(self, device: str | None = None) -> dict[str, Any]: ...

    async def status(self) -> Status: ...

    async def modes(self) -> dict[str, dict[str, Any]]: ...

    async def metrics(self) -> str: ...

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None: ...


SYNC_METHODS = ("submit", "switch_mode", "restart", "unload", "status", "modes", "metrics", "shutdown")
