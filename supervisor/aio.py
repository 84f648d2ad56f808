"""``AsyncSupervisor``: the supervisor in this process for asyncio code,
the async face ``supervisor.surface`` declares over ``Supervisor``. Every
call is the sync one awaited, so the two cannot drift apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from supervisor.api import Supervisor
from supervisor.config import Config
from supervisor.surface import AsyncSupervisorAPI

T = TypeVar("T")


class AsyncSupervisor(AsyncSupervisorAPI):
    """The same supervisor for asyncio code: every call is awaitable, and
    cancelling the awaiting task cancels a job that is still queued (and
    stops a streamed one that runs)."""

    _sync: Supervisor

    def __init__(self, config: str | Path | Config | None = None, *, mode: str | None = None):
        self._sync = Supervisor(config, mode=mode)

    @property
    def config(self) -> Config:
        return self._sync.config

    async def start(self) -> AsyncSupervisor:
        self._sync.start()
        return self

    async def _ask(self, call: Callable[[], T]) -> T:
        """In this process a plain answer is a snapshot that never waits."""
        return call()

    async def __aenter__(self) -> AsyncSupervisor:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown(drain=True)
