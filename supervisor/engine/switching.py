"""A mode switch in progress, from stopping the old worker to the new one's
READY, and the wait in between for the old worker's memory to come back.

A switch goes through three phases. STOPPING: the old worker was asked to
stop and the loop waits for its pidfd. RECLAIMING: it is reaped; on a GPU
the next worker starts only once NVML no longer lists the old pid and the
device is back within ``reclaim_tolerance_mib`` of the baseline taken
before the old worker started (read every 20 ms from the loop's deadlines,
bounded by ``reclaim_timeout``), because a new worker that allocated into
memory still held would fail or fragment. STARTING: the new worker is
spawned (or a warm standby taken) and loads; its READY completes the switch
with what it cost.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from protocol import GpuvisorError
from supervisor.engine.commands import QueuedSwitch
from supervisor.engine.gpu import Reclaim
from supervisor.status import SwitchResult

log = logging.getLogger("gpuvisor")

RECLAIM_POLL_S = 0.02  # how often NVML is read while a switch waits for memory to come back


class SwitchPhase(enum.Enum):
    STOPPING = "stopping"
    RECLAIMING = "reclaiming"
    STARTING = "starting"


@dataclass
class Gone:
    """A device's last worker after its end, until its memory is verified back."""

    pid: int
    baseline_used: int | None  # device memory used before it started
    used_before: int | None  # device memory used just before it stopped
    rss_bytes: int | None  # its RSS at the last sample (host memory, never VRAM)
    stopping_since: float


@dataclass
class Switch:
    mode: str
    request: QueuedSwitch
    previous: str | None  # the mode of the worker it replaces, if any
    started: float  # when it began (the engine's clock)
    phase: SwitchPhase = SwitchPhase.STOPPING
    stop_seconds: float | None = None
    standby: bool = False  # the new worker was the warm standby
    figures: dict[str, Any] = field(default_factory=dict)  # what the worker it stopped gave back
    waiting_for: Gone | None = None  # RECLAIMING: the worker whose memory must be back first
    reclaim_until: float = 0.0
    failure: GpuvisorError | None = None  # its loader raised: it fails once that worker is reaped

    def stopped(self, gone: Gone | None, stopped_here: bool, now: float) -> None:
        """The old worker is reaped (or there was none). Figures are reported
        only for a worker this switch stopped: a worker that died or was
        unloaded earlier is still waited for, but readings taken hours apart
        would mean nothing."""
        if stopped_here:
            self.stop_seconds = now - self.started
        if gone is not None and stopped_here:
            self.figures = {"previous_pid": gone.pid, "previous_rss_bytes": gone.rss_bytes}

    def reclaimed(self, reading: Reclaim, gone: Gone, now: float) -> None:
        """The wait for ``gone``'s memory is over (``reading.complete``, or
        ``reclaim_until`` passed)."""
        if not reading.complete:
            log.warning(
                "VRAM of worker pid %d not verified back in time (pid listed: %s, device used %s vs baseline %s)",
                gone.pid,
                not reading.pid_gone,
                reading.used_after,
                gone.baseline_used,
            )
        if self.figures:
            self.figures.update(reading.as_result(), reclaim_seconds=now - gone.stopping_since)  # the kill included
        self.waiting_for = None

    def no_gpu(self, gone: Gone | None, now: float) -> None:
        """Without NVML the reap was the reclaim: RSS is reported as RSS,
        never as VRAM."""
        if self.figures and gone is not None:
            self.figures.update(reclaimed_bytes=None, reclaim_seconds=now - gone.stopping_since, reclaim_complete=None)

    def result(
        self,
        pid: int,
        load_seconds: float | None,
        warmup_seconds: float | None,
        spawn_seconds: float | None,
        now: float,
    ) -> SwitchResult:
        return {
            "mode": self.mode,
            "status": "restarted" if self.request.restart else "loaded",
            "previous": self.previous,
            "seconds": now - self.started,
            "load_seconds": load_seconds,
            "warmup_seconds": warmup_seconds,
            "stop_seconds": self.stop_seconds,
            "spawn_seconds": spawn_seconds,
            "standby": self.standby,
            "pid": pid,
            **self.figures,  # type: ignore[typeddict-item]
        }
