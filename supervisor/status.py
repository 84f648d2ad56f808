"""What the supervisor tells about itself: the status snapshot and the
result of a switch, as typed maps. They are documented here once; the
daemon sends the same maps to its clients, and docs/protocol.md lists
their fields for other languages."""

from __future__ import annotations

from typing import Any, TypedDict


class TorchMemory(TypedDict, total=False):
    allocated_bytes: int
    reserved_bytes: int
    peak_bytes: int


class GpuMemory(TypedDict, total=False):
    index: int
    name: str
    uuid: str
    used_bytes: int | None
    total_bytes: int | None


class Status(TypedDict):
    """A snapshot the loop publishes after every turn; reading it never blocks."""

    state: str  # "not_started", "running", "draining", "failed" or "stopped"
    mode: str | None  # the mode a serving worker has loaded, else None
    worker_state: str  # "none", "spawned", "loading", "ready", "busy", "draining", "stopping", "exited"
    worker_pid: int | None
    generation: int  # workers started so far; a worker's messages carry its generation
    queued: int  # jobs and switches waiting
    waiting: dict[str, dict[str, float]]  # per mode: "jobs" waiting and "oldest_s", the oldest one's wait
    in_flight: int  # jobs handed to the worker (the first runs, the rest wait in its socket)
    window: int
    restarts: int  # workers respawned after an unexpected death
    jobs_done: int
    switching_to: str | None
    reclaiming: bool  # a switch waits for the last worker's VRAM to show free
    standby_pid: int | None
    standby_ready: bool
    standby_paused: bool  # the spare is stopped (SIGSTOP) while a heavy worker loads or runs jobs
    last_error: str | None  # why the mode in force is not loaded, after a failed switch
    failed_reason: str | None  # set while state is "failed": every mode is broken
    broken_modes: dict[str, dict[str, Any]]  # modes no device may run now: "reason", "retry_in_s" (None: an operator's)
    idle_unloaded: str | None  # the mode idle_unload_s stopped, until it loads again
    oom_recycles: int
    batches: dict[str, int]  # batches of more than one job sent: "count", "jobs", "largest", "last"
    device: str  # "cpu" or "cuda:N"
    gpu_unavailable: str | None  # why VRAM is not measured
    worker_rss_bytes: int | None  # host memory, never VRAM
    worker_vram_bytes: int | None  # what NVML attributes to the worker
    worker_torch: TorchMemory | None  # torch's own figures, from the worker
    gpu: GpuMemory | None
    devices: list[dict[str, Any]]  # every device: "name", "broken" (its broken modes), and the fields above
    config: str  # where the configuration came from


class SwitchResult(TypedDict, total=False):
    """The answer to ``switch_mode()`` and ``restart()``. ``already_loaded``
    carries only ``mode``, ``status`` and ``pid``."""

    mode: str
    status: str  # "already_loaded", "loaded" or "restarted"
    pid: int
    previous: str | None  # the mode loaded before, if any
    seconds: float  # the whole switch, from its start to READY
    load_seconds: float | None  # the loader's own time in the worker
    warmup_seconds: float | None
    stop_seconds: float | None  # stopping and reaping the worker it replaced
    spawn_seconds: float | None  # from starting the worker to its HELLO
    standby: bool  # the new worker was the warm standby
    previous_pid: int
    previous_rss_bytes: int | None
    reclaimed_bytes: int | None  # VRAM back on the device (NVML); None without a GPU
    reclaim_seconds: float
    reclaim_complete: bool | None
    vram_used_before: int | None
    vram_used_after: int | None


def already_loaded(mode: str, pid: int) -> SwitchResult:
    return {"mode": mode, "status": "already_loaded", "pid": pid}


def not_started() -> dict[str, Any]:
    return {"state": "not_started"}
