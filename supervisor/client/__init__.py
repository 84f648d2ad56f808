"""Talk to a running ``gpuvisor serve`` from another process: ``Client``
(threads, Futures) and ``AsyncClient`` (asyncio). As light as pyzmq and
msgpack: nothing of the engine, and never torch."""

from supervisor.client.aio import AsyncClient
from supervisor.client.client import Client
from supervisor.client.endpoint import UnsafeRuntimeDir

__all__ = ["AsyncClient", "Client", "UnsafeRuntimeDir"]
