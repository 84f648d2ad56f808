"""``AsyncClient``: the daemon's client for asyncio, over a ``Client``.
A Future's answer is handed to the event loop by the client's I/O thread;
the calls that wait for a plain answer wait in the loop's executor."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from supervisor.arguments import check_submit
from supervisor.client.client import Client
from supervisor.status import Status, SwitchResult
from supervisor.stream import AsyncJobStream


class AsyncClient:
    """``Client`` for asyncio: every call is awaitable. A Future's answer is
    handed to this event loop by the client's I/O thread; the calls that
    wait for a plain answer (``status``, ``modes``, ``shutdown``) wait in the
    loop's executor."""

    def __init__(self, endpoint: str | None = None, **kwargs: Any):
        self._sync = Client(endpoint, **kwargs)

    async def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        stream: bool = False,
        on_chunk: Callable[[Any], None] | None = None,
    ) -> Any:
        """The result; with ``stream=True`` an ``AsyncJobStream``."""
        if not stream:
            return await asyncio.wrap_future(
                self._sync.submit(task, payload, mode=mode, timeout=timeout, retries=retries, on_chunk=on_chunk)
            )
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

    async def reload(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.reload)

    async def status(self) -> Status:
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.status)

    async def modes(self) -> dict[str, dict[str, Any]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.modes)

    async def metrics(self) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.metrics)

    async def ping(self) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, self._sync.ping)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._sync.shutdown, drain, timeout)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
