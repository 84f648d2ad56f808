"""The status the loop publishes each turn: an immutable snapshot API
threads read without a lock (``supervisor.status.Status`` documents its
fields), built from the devices, the queue and the configuration."""

from __future__ import annotations

from typing import Any

from supervisor.engine import placement
from supervisor.engine.device import Device
from supervisor.engine.device_state import Parts
from supervisor.engine.worker_handle import SERVING
from supervisor.status import Status


def describe(device: Device) -> dict[str, Any]:
    """One device in the status: its worker, its counters, its memory."""
    w, sw, memory = device.worker, device.switch, device.memory
    return {
        "name": device.name,
        "mode": w.mode if w is not None and w.state in SERVING else None,
        "worker_state": w.state.value if w is not None else "none",
        "worker_pid": w.pid if w is not None else None,
        "in_flight": len(w.in_flight) if w is not None else 0,
        "restarts": device.restarts,
        "jobs_done": device.jobs_done,
        "switching_to": sw.mode if sw is not None else None,
        "reclaiming": sw is not None and sw.waiting_for is not None,
        "standby_pid": device.standby.pid,
        "standby_ready": device.standby.ready,
        "standby_paused": device.standby.paused,
        "last_error": device.mode_error,
        "failed_reason": device.failed_reason(),
        "broken": _broken_here(device),
        "idle_unloaded": device.idle_unloaded,
        "oom_recycles": device.oom_recycles,
        "batches": dict(device.batches),
        "device": device.choice.kind if device.choice.index is None else f"cuda:{device.choice.index}",
        "gpu_unavailable": device.gpu_unavailable,
        "worker_rss_bytes": memory.get("worker_rss_bytes"),
        "worker_vram_bytes": memory.get("worker_vram_bytes"),
        "worker_torch": memory.get("worker_torch"),
        "gpu": device.gpu,
    }


def _broken_here(device: Device) -> dict[str, dict[str, Any]]:
    """The modes broken on this device: why, and when each is tried
    again (seconds from the snapshot; None: only an operator's word)."""
    out = {}
    for budget in device.breakers.tripped():
        retry_in = budget.retry_in()
        out[budget.mode] = {"reason": budget.failed, "retry_in_s": None if retry_in is None else round(retry_in, 1)}
    return out


def _broken_modes(parts: Parts, devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The modes no device may run now, each with the reason and retry
    time of the device where it is tried again soonest."""
    config = parts.settings.config
    out: dict[str, dict[str, Any]] = {}
    for device in devices:
        for mode, entry in device["broken"].items():
            if mode in config.modes and not placement.can_serve(config, parts.devices, mode):
                kept = out.get(mode)
                soon = entry["retry_in_s"] if entry["retry_in_s"] is not None else float("inf")
                if kept is None or soon < (kept["retry_in_s"] if kept["retry_in_s"] is not None else float("inf")):
                    out[mode] = entry
    return out


def snapshot(parts: Parts, state: str | None) -> Status:
    """The status now; ``state`` None: running, draining or failed, as it is."""
    config = parts.settings.config
    devices = [describe(device) for device in parts.devices]
    broken = _broken_modes(parts, devices)
    if state is None:
        failed = bool(broken) and len(broken) == len(config.modes)  # no mode can serve
        state = "draining" if parts.stopping else "failed" if failed else "running"
    first = devices[0]
    reasons = [f"{mode}: {entry['reason']}" for mode, entry in broken.items()]
    status: Status = {
        "state": state,
        **first,  # type: ignore[typeddict-item]  # the first device's worker, at the top as with one device
        "generation": parts.generation,
        "queued": len(parts.queue),
        "waiting": parts.queue.waiting(),
        "window": config.window,
        "in_flight": sum(d["in_flight"] for d in devices),
        "restarts": sum(d["restarts"] for d in devices),
        "jobs_done": sum(d["jobs_done"] for d in devices),
        "oom_recycles": sum(d["oom_recycles"] for d in devices),
        "failed_reason": f"every mode is broken ({'; '.join(reasons)})" if state == "failed" else None,
        "broken_modes": broken,
        "devices": devices,
        "config": config.source,
    }
    del status["name"], status["broken"]  # type: ignore[typeddict-item]  # the device's own keys
    return status
