"""``AsyncClient``: the daemon's client for asyncio, the async face of
``supervisor.surface`` over a ``Client``. A Future's answer is handed to the
event loop by the client's I/O thread; the calls that wait for a plain
answer wait in the loop's executor."""

from __future__ import annotations

from typing import Any

from supervisor.client.client import Client
from supervisor.surface import AsyncSupervisorAPI


class AsyncClient(AsyncSupervisorAPI):
    """``Client`` for asyncio: every call is awaitable. A Future's answer is
    handed to this event loop by the client's I/O thread; the calls that
    wait for a plain answer (``status``, ``modes``, ``shutdown``) wait in the
    loop's executor."""

    _sync: Client

    def __init__(self, endpoint: str | None = None, **kwargs: Any):
        self._sync = Client(endpoint, **kwargs)

    async def reload(self) -> dict[str, Any]:
        return await self._ask(self._sync.reload)

    async def ping(self) -> dict[str, Any]:
        return await self._ask(self._sync.ping)

    async def close(self) -> None:
        await self._ask(self._sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
