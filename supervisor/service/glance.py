"""What the status page (``/ui``) and ``gpuvisor top`` draw: the status
now, and the last minutes the status alone forgets (the switches with
their phases, each worker's memory over time, the errors).

The status is a snapshot: it cannot say how long the last switch's load
took, nor how a worker's memory grew, nor what failed a minute ago. One
``Glance`` per daemon keeps those in bounded rings, fed by the
supervisor's own event stream (the same one ``gpuvisor events`` follows)
and by a status sample every few seconds, so every viewer sees one
history and looking costs the engine nothing. The picture is a plain map
of numbers and strings: JSON for the page, msgpack for the ZeroMQ door.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from supervisor.surface import SupervisorAPI

log = logging.getLogger("gpuvisor")

SAMPLE_EVERY_S = 2.0  # a memory point per device this often ...
KEEP_S = 600.0  # ... for the last ten minutes
SWITCHES_KEPT = 20
ERRORS_KEPT = 20
PHASES = ("stop", "reclaim", "spawn", "load", "warmup")  # a switch's phases, in order, as the metrics name them


class Glance:
    """The rings, and the thread that fills them. ``record`` and ``sample``
    are the whole of its logic, so a test can feed them by hand."""

    def __init__(self, clock: Callable[[], float] = time.time, sample_every: float = SAMPLE_EVERY_S):
        self._clock = clock
        self._sample_every = sample_every
        self._lock = threading.Lock()  # the rings are written by the thread, read by any viewer
        self._switches: collections.deque[dict[str, Any]] = collections.deque(maxlen=SWITCHES_KEPT)
        self._open: dict[str, dict[str, Any]] = {}  # the switch under way on each device
        self._phase_began: dict[str, float] = {}  # device -> its switch's elapsed seconds when this phase began
        self._queued: dict[str, float] = {}  # mode -> when an explicit switch to it was queued
        self._errors: collections.deque[dict[str, Any]] = collections.deque(maxlen=ERRORS_KEPT)
        points = int(KEEP_S / sample_every) + 1
        self._memory: dict[str, collections.deque[list[Any]]] = collections.defaultdict(
            lambda: collections.deque(maxlen=points)
        )
        self._thread: threading.Thread | None = None
        self._stream: Any = None

    # ------------------------------------------------------------ fed

    def record(self, ev: Mapping[str, Any]) -> None:
        """One event of the supervisor's stream."""
        name = ev.get("event")
        with self._lock:
            if name == "switch":
                self._switch_phase(ev)
            elif name == "worker_ended" and not ev.get("expected", True):
                self._error(ev, f"worker {ev.get('pid')} ended: {ev.get('why')}")

    def sample(self, status: Mapping[str, Any]) -> None:
        """One memory point per device from a status snapshot."""
        now = round(self._clock(), 1)
        with self._lock:
            for d in status.get("devices", ()):
                gpu = d.get("gpu") or {}
                point = [now, d.get("worker_rss_bytes"), d.get("worker_vram_bytes"), gpu.get("used_bytes")]
                self._memory[d["name"]].append(point)

    def _switch_phase(self, ev: Mapping[str, Any]) -> None:
        phase, mode, device = ev.get("phase"), ev.get("mode"), ev.get("device")
        t = float(ev.get("t", self._clock()))
        if phase == "queued" or device is None:
            self._queued.setdefault(str(mode), t)
            return
        elapsed = float(ev.get("elapsed") or 0.0)
        sw = self._open.get(device)
        if sw is None or sw["mode"] != mode:
            started = self._queued.pop(str(mode), t - elapsed)
            sw = {
                "device": device,
                "mode": mode,
                "previous": ev.get("previous"),
                "why": ev.get("why"),
                "started": round(started, 3),
                "phase": phase,
                "phases": {},
                "seconds": None,
                "outcome": "under way",
                "error": None,
                "failed_in": None,
            }
            self._open[device] = sw
            self._switches.appendleft(sw)
            self._phase_began[device] = elapsed
        last = sw["phase"]
        if phase != last:
            if last in PHASES:  # the phase before ended now: its time, as far as seen
                sw["phases"][last] = round(max(0.0, elapsed - self._phase_began[device]), 4)
            self._phase_began[device] = elapsed
        sw["phase"] = phase
        if phase == "ready":
            sw["outcome"], sw["seconds"] = "ready", _rounded(ev.get("seconds"))
            sw["phases"] = {p: _rounded(ev.get(f"{p}_seconds")) for p in PHASES if ev.get(f"{p}_seconds") is not None}
            del self._open[device]
        elif phase == "failed":
            sw["outcome"], sw["error"] = "failed", ev.get("error")
            sw["failed_in"] = last if last in PHASES else None
            sw["seconds"] = round(t - sw["started"], 3)
            del self._open[device]
            self._error(ev, f"switch to {mode!r} failed: {ev.get('error')}")

    def _error(self, ev: Mapping[str, Any], what: str) -> None:
        t = round(float(ev.get("t", self._clock())), 3)
        self._errors.appendleft({"t": t, "device": ev.get("device"), "mode": ev.get("mode"), "what": what})

    # ------------------------------------------------------------ read

    def picture(self, status: Mapping[str, Any]) -> dict[str, Any]:
        """The status now beside what the rings kept; every value msgpack and JSON can carry."""
        with self._lock:
            switches = [{**sw, "phases": dict(sw["phases"])} for sw in self._switches]
            memory = {name: [list(p) for p in points] for name, points in self._memory.items()}
            errors = list(self._errors)
        devices = [_device(d) for d in status.get("devices", ())]
        for d in devices:
            if d["last_error"] and not any(e["what"] == d["last_error"] for e in errors):
                errors.append({"t": None, "device": d["name"], "mode": d["mode"], "what": d["last_error"]})
        return {
            "at": round(self._clock(), 3),
            "state": status.get("state"),
            "failed_reason": status.get("failed_reason"),
            "config": status.get("config"),
            "modes": list(status.get("modes", ())),
            "devices": devices,
            "queued": status.get("queued", 0),
            "waiting": dict(status.get("waiting", {})),
            "restarts": status.get("restarts", 0),
            "jobs_done": status.get("jobs_done", 0),
            "broken_modes": dict(status.get("broken_modes", {})),
            "switches": switches,
            "memory": memory,
            "errors": errors,
        }

    # ------------------------------------------------------------ the thread

    def start(self, sup: SupervisorAPI) -> None:
        """Follow ``sup`` until it stops (or ``close``)."""
        self._stream = sup.events(buffer=1024)
        self._thread = threading.Thread(target=self._run, args=(sup,), name="gpuvisor-glance", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, sup: SupervisorAPI) -> None:
        stream, due = self._stream, time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now >= due:
                    self.sample(sup.status())
                    due = now + self._sample_every
                ev = stream.next(timeout=max(0.0, due - time.monotonic()))
                if ev is not None:
                    self.record(ev)
                elif stream.over:
                    return
        except Exception:  # the page loses its history, never the daemon its loop
            log.exception("the status page's history stopped")


def _rounded(seconds: Any) -> float | None:
    return None if seconds is None else round(float(seconds), 4)


def _device(d: Mapping[str, Any]) -> dict[str, Any]:
    """One device as the viewers draw it: fewer fields than the status, named for reading."""
    gpu = d.get("gpu") or {}
    return {
        "name": d["name"],
        "device": d.get("device"),
        "mode": d.get("mode"),
        "worker_state": d.get("worker_state"),
        "worker_pid": d.get("worker_pid"),
        "switching_to": d.get("switching_to"),
        "in_flight": d.get("in_flight", 0),
        "restarts": d.get("restarts", 0),
        "jobs_done": d.get("jobs_done", 0),
        "rss_bytes": d.get("worker_rss_bytes"),
        "vram_bytes": d.get("worker_vram_bytes"),
        "gpu_name": gpu.get("name"),
        "gpu_used_bytes": gpu.get("used_bytes"),
        "gpu_total_bytes": gpu.get("total_bytes"),
        "last_error": d.get("last_error"),
        "failed_reason": d.get("failed_reason"),
        "broken": dict(d.get("broken", {})),
        "idle_unloaded": d.get("idle_unloaded"),
        "standby_ready": d.get("standby_ready", False),
    }
