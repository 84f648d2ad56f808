"""gpuvisor's supervisor: keeps GPU work in a child process it can kill.

The supervisor never imports torch or touches CUDA; everything that does
lives in the worker process. See ``docs/architecture.md``.
"""

from protocol.errors import (
    ClientCutOff,
    DaemonUnavailable,
    GpuvisorError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    ModeLoadError,
    NoModeLoaded,
    OutOfMemory,
    ProtocolError,
    QueueFull,
    ShuttingDown,
    StreamIncomplete,
    SupervisorFailed,
    UnknownMode,
    UnknownTask,
    WorkerCrashed,
)
from supervisor.api import AsyncSupervisor, JobStream, Supervisor
from supervisor.config import Config, ConfigError, ModeSpec
from supervisor.config import load as load_config

__all__ = [
    "AsyncSupervisor",
    "ClientCutOff",
    "Config",
    "ConfigError",
    "DaemonUnavailable",
    "GpuvisorError",
    "JobStream",
    "JobCancelled",
    "JobFailed",
    "JobTimeout",
    "ModeLoadError",
    "ModeSpec",
    "NoModeLoaded",
    "OutOfMemory",
    "ProtocolError",
    "QueueFull",
    "ShuttingDown",
    "StreamIncomplete",
    "SupervisorFailed",
    "Supervisor",
    "UnknownMode",
    "UnknownTask",
    "WorkerCrashed",
    "load_config",
]
