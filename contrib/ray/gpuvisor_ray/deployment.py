"""The Ray Serve deployment: one replica, one GPU, one gpuvisor supervisor.

Ray gives each replica its GPU (``num_gpus=1``: Ray sets the replica's
``CUDA_VISIBLE_DEVICES``, and the config's ``device = "auto"`` hands that
very GPU on to the worker; a replica given no GPU runs its worker on the
CPU). The replica process is the supervisor: it never
imports torch; the worker it starts does, and a mode change kills that
worker, so every byte of the replica's VRAM comes back.

A replica's life, as Serve drives it::

    __init__      awaited before the replica takes traffic: config -> supervisor,
                  then the first mode loaded (a loader that raises fails the replica)
    __call__ / submit, switch_mode, restart, status, modes
                  any number at once; the replica's own queue orders them
    check_health  every health_check_period_s: a supervisor that gave up
                  (state "failed") makes Serve replace the replica
    __del__       awaited when Serve stops the replica: queued jobs drain, the
                  worker gets DRAIN, exits, and is reaped. Should Serve kill the
                  replica first (graceful_shutdown_timeout_s), the worker dies
                  with it: it is armed to die with its supervisor.

Errors: a gpuvisor error raised here (``JobFailed``, ``ModeLoadError`` ...)
reaches the caller as Ray's error for a failed call, whose ``cause`` is the
gpuvisor error itself, with its ``code``; see contrib/ray/README.md.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import ray
from ray import serve

from gpuvisor_ray.logs import forward_gpuvisor_log
from supervisor import AsyncSupervisor, Config, SupervisorFailed, load_config
from supervisor.config import parse as parse_config


def read_config(config: str | Path | None, config_text: str | None) -> Config:
    """A path is read on the node the replica runs on; text travels with the
    deployment, so it suits a cluster whose nodes share no files."""
    if config is not None and config_text is not None:
        raise ValueError("give the gpuvisor config as a path (config=) or as TOML text (config_text=), not both")
    if config_text is not None:
        return parse_config(config_text, "<config_text given to GpuvisorDeployment>")
    return load_config(config)


def on_ray_gpus(config: Config) -> Config:
    """The worker gets the GPUs Ray gave this replica, and no other. Ray sets
    ``CUDA_VISIBLE_DEVICES`` for a replica it gives GPUs, which ``device =
    "auto"`` honours; for a replica it gives none it now leaves the variable
    alone, and "auto" would take the first GPU NVML sees, perhaps another
    replica's. Such a replica runs its worker on the CPU."""
    if config.device == "auto" and not ray.get_gpu_ids():
        return dataclasses.replace(config, device="cpu")
    return config


# max_ongoing_requests: jobs waiting inside a replica are what its scheduler
# groups by mode and what a batch handler gets as one call (embed takes up to
# 64), so a replica is sent more than Serve's default of 5 at once.
@serve.deployment(ray_actor_options={"num_gpus": 1}, max_ongoing_requests=64)
class GpuvisorDeployment:
    """A Serve replica that owns one GPU through a gpuvisor supervisor.

    Bind with ``config`` (a TOML file's path on the replica's node) or
    ``config_text`` (the TOML itself), neither for the built-in default;
    ``mode``: the mode each replica loads before it takes traffic (else the
    config's ``default_mode``, else none until a job names one);
    ``drain_timeout``: seconds queued jobs may still run when Serve stops
    the replica (keep it inside the deployment's
    ``graceful_shutdown_timeout_s``, 20 by default).
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        config: str | Path | None = None,
        *,
        config_text: str | None = None,
        mode: str | None = None,
        drain_timeout: float = 10.0,
    ) -> None:
        forward_gpuvisor_log()
        loaded = on_ray_gpus(read_config(config, config_text))
        initial = mode or loaded.default_mode or None
        self._drain_timeout = drain_timeout
        self._replica = {
            "id": serve.get_replica_context().replica_tag,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }
        self._supervisor = AsyncSupervisor(loaded)
        await self._supervisor.start()
        if initial is not None:
            try:
                await self._supervisor.switch_mode(initial)
            except BaseException:
                await self._supervisor.shutdown(drain=False)
                del self._supervisor  # nothing left for __del__ to stop
                raise

    async def __call__(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> Any:
        """``handle.remote(task, payload, mode=..., timeout=...)``: the same as ``submit``."""
        return await self.submit(task, payload, mode=mode, timeout=timeout, retries=retries)

    async def submit(
        self,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> Any:
        """The handler's result (numpy arrays included), or a gpuvisor error.
        ``mode``: switch this replica first if another mode is loaded;
        ``timeout``: seconds of running time in the worker; ``retries``: the
        job is idempotent, run it again if the worker dies under it."""
        return await self._supervisor.submit(task, payload, mode=mode, timeout=timeout, retries=retries)

    async def switch_mode(self, mode: str) -> dict[str, Any]:
        """Switch the replica this call reached (through a handle, Serve
        picks one); the answer names it under ``replica``."""
        return {**await self._supervisor.switch_mode(mode), "replica": self._replica["id"]}

    async def restart(self, mode: str | None = None) -> dict[str, Any]:
        """A fresh worker on the replica this call reached; clears ``failed``."""
        return {**await self._supervisor.restart(mode), "replica": self._replica["id"]}

    async def status(self) -> dict[str, Any]:
        """gpuvisor's status of the replica this call reached, and under
        ``replica`` which one that is: Serve's replica id, its process id
        and its Ray node."""
        return {**await self._supervisor.status(), "replica": dict(self._replica)}

    async def modes(self) -> dict[str, dict[str, Any]]:
        return await self._supervisor.modes()

    async def check_health(self) -> None:
        """Serve replaces a replica whose check raises. A supervisor that gave
        up on its worker (too many deaths in ``restart_window``) would fail
        every job, and no caller can reach this one replica to restart it."""
        status = await self._supervisor.status()
        if status["state"] == "failed":
            raise SupervisorFailed(f"replica {self._replica['id']}: {status['failed_reason']}")

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica (the documented cleanup
        hook); it returns once the worker is reaped."""
        supervisor = getattr(self, "_supervisor", None)  # None: __init__ failed and stopped it
        if supervisor is not None:
            await supervisor.shutdown(drain=True, timeout=self._drain_timeout)
