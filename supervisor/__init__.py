"""gpuvisor's supervisor: keeps GPU work in a child process it can kill.

The one import for users: ``from supervisor import Supervisor``. Names are
resolved on first use (PEP 562), so ``import supervisor.client`` in a
client process loads the client and nothing of the engine. The supervisor
never imports torch or touches CUDA; everything that does lives in the
worker process. See ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_ERRORS = (
    "ClientCutOff",
    "DaemonUnavailable",
    "Forbidden",
    "GpuvisorError",
    "JobCancelled",
    "JobFailed",
    "JobTimeout",
    "ModeBroken",
    "ModeLoadError",
    "NoModeLoaded",
    "OutOfMemory",
    "ProtocolError",
    "QueueFull",
    "RequestTooLarge",
    "ShuttingDown",
    "StreamIncomplete",
    "SupervisorFailed",
    "UnknownMode",
    "UnknownTask",
    "WorkerCrashed",
    "WrongDevice",
)
# name -> (module, attribute in it)
_WHERE: dict[str, tuple[str, str]] = {
    **{name: ("protocol.errors", name) for name in _ERRORS},
    "Supervisor": ("supervisor.api", "Supervisor"),
    "AsyncSupervisor": ("supervisor.aio", "AsyncSupervisor"),
    "JobStream": ("supervisor.stream", "JobStream"),
    "JobFuture": ("supervisor.futures", "JobFuture"),
    "Config": ("supervisor.config", "Config"),
    "ConfigError": ("supervisor.config", "ConfigError"),
    "ModeSpec": ("supervisor.config", "ModeSpec"),
    "load_config": ("supervisor.config", "load"),
    "Status": ("supervisor.status", "Status"),
    "SwitchResult": ("supervisor.status", "SwitchResult"),
}

__all__ = [
    "AsyncSupervisor",
    "ClientCutOff",
    "Config",
    "ConfigError",
    "DaemonUnavailable",
    "Forbidden",
    "GpuvisorError",
    "JobCancelled",
    "JobFailed",
    "JobFuture",
    "JobStream",
    "JobTimeout",
    "ModeBroken",
    "ModeLoadError",
    "ModeSpec",
    "NoModeLoaded",
    "OutOfMemory",
    "ProtocolError",
    "QueueFull",
    "RequestTooLarge",
    "ShuttingDown",
    "Status",
    "StreamIncomplete",
    "Supervisor",
    "SupervisorFailed",
    "SwitchResult",
    "UnknownMode",
    "UnknownTask",
    "WorkerCrashed",
    "WrongDevice",
    "load_config",
]


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'supervisor' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # once resolved, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what editors and type checkers see
    from protocol.errors import (
        ClientCutOff,
        DaemonUnavailable,
        Forbidden,
        GpuvisorError,
        JobCancelled,
        JobFailed,
        JobTimeout,
        ModeBroken,
        ModeLoadError,
        NoModeLoaded,
        OutOfMemory,
        ProtocolError,
        QueueFull,
        RequestTooLarge,
        ShuttingDown,
        StreamIncomplete,
        SupervisorFailed,
        UnknownMode,
        UnknownTask,
        WorkerCrashed,
        WrongDevice,
    )
    from supervisor.aio import AsyncSupervisor
    from supervisor.api import Supervisor
    from supervisor.config import Config, ConfigError, ModeSpec
    from supervisor.config import load as load_config
    from supervisor.futures import JobFuture
    from supervisor.status import Status, SwitchResult
    from supervisor.stream import JobStream
