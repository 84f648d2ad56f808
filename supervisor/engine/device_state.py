"""What a device is: its state and what it shows, the parts it shares
with the loop, and how its worker is made to end (stop, kill, reap).

``device.Device`` is the one object per device; its methods come in
layers, each in a module of its own: this one (``DeviceState``: its
fields, what placement and the status read, the worker's end decided),
``device_switch`` (a switch, from stopping the old worker to the new one's
READY, and the one place a worker is spawned) and ``device`` (its jobs,
its deadlines and the one place a worker's end is handled). Nothing
outside them writes a device's fields.

Nothing that decides a worker must go waits for it: ``stop()`` asks it to
end (SIGTERM, then SIGKILL at a deadline), ``kill()`` ends it now; its
pidfd fires; ``notice_exit()`` reaps it, and with jobs in flight its socket
is read a moment longer for its last words; then ``Device.conclude()``
settles what it held.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import GpuvisorError, ModeBroken, WorkerCrashed
from supervisor.config import Config
from supervisor.engine import placement
from supervisor.engine.budget import Breakers
from supervisor.engine.commands import QueuedJob
from supervisor.engine.deadlines import Deadline, Deadlines
from supervisor.engine.devices import DeviceChoice
from supervisor.engine.followers import Followers
from supervisor.engine.gpu import GpuMeter, process_rss
from supervisor.engine.link import WorkerLink
from supervisor.engine.outcomes import Outcomes
from supervisor.engine.process import Processes
from supervisor.engine.queue import JobQueue
from supervisor.engine.settings import Settings
from supervisor.engine.standby import StandbyPool
from supervisor.engine.switching import Gone, Switch, SwitchPhase
from supervisor.engine.worker_handle import Ending, WorkerHandle, WorkerState
from supervisor.metrics import Metrics

log = logging.getLogger("gpuvisor")

LAST_WORDS_QUIET_S = 0.02  # after a death: the worker's socket quiet this long means all it sent is in
LAST_WORDS_MAX_S = 0.5


@dataclass
class Parts:
    """What the devices share with the loop: the parts below both, made by
    the loop. ``devices`` is every device, in order (placement's rules read
    them all); ``stopping`` is set once, when shutdown begins."""

    settings: Settings
    queue: JobQueue
    deadlines: Deadlines
    link: WorkerLink
    processes: Processes
    clock: Callable[[], float]
    outcomes: Outcomes
    followers: Followers
    metrics: Metrics
    tasks: dict[str, list[str]] = field(default_factory=dict)  # mode -> its tasks, as its worker said in READY
    devices: list[Any] = field(default_factory=list)  # each a device.Device, the layer above this module
    generation: int = 0  # the last worker generation handed out, on any device
    stopping: bool = False


class Recycle:
    """The worker goes once the jobs handed to it are done: after an OOM
    (``recycle_on_oom``) or an operator's ``unload()``. The mode stays in
    force either way."""

    def __init__(self, why: str, unload: bool = False) -> None:
        self.why = why
        self.unload = unload  # an operator's word: status shows the mode as unloaded


class DeviceState:
    def __init__(self, parts: Parts, choice: DeviceChoice, index: int = 0, name: str = ""):
        self.parts = parts
        self.clock = parts.clock
        self.index = index  # its place in the loop's list: its deadlines carry it
        self._keys = {name: (name, self) for name in Deadline}  # made once: set anew every turn
        self.name = name or choice.setting  # what status, metrics and switch_mode(device=) call it
        self.choice = choice
        meter = GpuMeter.open(choice.index) if choice.index is not None else choice.reason
        self.meter: GpuMeter | None = meter if isinstance(meter, GpuMeter) else None
        self.gpu_unavailable: str | None = None if self.meter is not None else str(meter)
        self.gpu: dict[str, Any] | None = self.meter.snapshot() if self.meter is not None else None
        self.worker: WorkerHandle | None = None
        # The mode in force: loaded, being loaded, or wanted again after its
        # worker died or its last load failed. Only a switch changes it.
        self.mode: str | None = None
        self.mode_served = False  # the mode in force has been READY: a death while reloading it is a respawn's
        self.mode_since = 0.0  # when a mode was last put in force here (placement.mode_in_force)
        # Modes that failed to load here while another device held them: not
        # placed here again until then (the other device serves them).
        self.refused: dict[str, float] = {}
        self.free_since = 0.0  # when it last had nothing to do: the longest free gets a mode no device holds
        # When the loaded mode's turn at the worker began: its first job since
        # its READY (infinity until then: a mode runs at least one job a turn).
        self.turn_since = 0.0
        self.mode_error: str | None = None  # why the mode in force is not loaded, after a failed switch
        self.switch: Switch | None = None
        self.gone: Gone | None = None  # the last worker, until its memory is verified back
        self.breakers = Breakers(parts.settings, self.clock)  # a mode that keeps failing here is broken here, alone
        self.standby = StandbyPool(
            parts.link.endpoint, choice.env, parts.settings.config, wanted=self.standby_wanted(), clock=self.clock
        )
        self.restarts = 0
        self.jobs_done = 0
        self.memory: dict[str, Any] = {}  # the worker's memory at the last heartbeat
        self.idle_unloaded: str | None = None  # the mode idle_unload_s or unload() stopped, until it loads again
        self.oom_recycles = 0
        self.batches = {"count": 0, "jobs": 0, "largest": 0, "last": 0}  # batches sent (of more than one job)
        # (mode, task) of a batch handler -> how many jobs its last batch held: after a batch of one, the
        # next job waits for no others (max_delay_ms). Keys: the batch tasks workers listed in READY.
        self.last_batch: dict[tuple[str, str], int] = {}
        self.recycle: Recycle | None = None

    # ------------------------------------------------------------ what the loop reads

    def key(self, name: Deadline) -> tuple[Deadline, Any]:
        """``name`` as this device's entry in the deadline table."""
        return self._keys[name]

    @property
    def config(self):
        return self.parts.settings.config

    @property
    def mode_ahead(self) -> str | None:
        """The mode the next job will find: the switch under way's, else the
        mode in force."""
        return self.switch.mode if self.switch is not None else self.mode

    def taking_jobs(self) -> WorkerHandle | None:
        """The worker, if it can be handed jobs now."""
        w = self.worker
        if w is None or w.state not in (WorkerState.READY, WorkerState.BUSY) or self.switch is not None:
            return None
        return w

    def idle(self) -> bool:
        return self.worker is None and self.switch is None

    def busy(self) -> bool:
        """Running jobs or switching: not free for a job of another mode now."""
        return self.switch is not None or (self.worker is not None and bool(self.worker.in_flight))

    def backing_off(self, mode: str) -> bool:
        return self.breakers.of(mode).backing_off()

    def standby_wanted(self) -> bool:
        return self.config.warm_standby and not self.config.worker_command

    def may_run(self, mode: str | None) -> bool:
        parts = self.parts
        return placement.may_run(self.config, parts.devices, self, mode, self.clock())

    def failed_reason(self) -> str | None:
        """Why this device cannot serve its mode in force: the mode is broken here."""
        mode = self.mode
        return self.breakers.of(mode).failed if mode is not None and self.breakers.broken(mode) else None

    def broken_error(self, mode: str) -> ModeBroken:
        """What a job of ``mode`` gets while the mode is broken here."""
        budget = self.breakers.of(mode)
        retry_in = budget.retry_in()
        return ModeBroken(
            f"mode {mode!r} is broken: {budget.failed}",
            mode=mode,
            retry_in=None if retry_in is None else round(retry_in, 1),
        )

    def _live_worker(self) -> WorkerHandle:
        """The worker: the paths that call this run only while there is one."""
        if self.worker is None:
            raise RuntimeError("no worker")
        return self.worker

    def _switch_in_progress(self) -> Switch:
        """The switch: the phases that call this run only during one."""
        if self.switch is None:
            raise RuntimeError("no switch is under way")
        return self.switch

    def start_clock(self, job: QueuedJob) -> None:
        """A job's timeout counts from when it starts: when it reaches the head
        of the jobs in flight (the worker runs them in order), or when its
        batch is sent (the jobs of a batch run as one call)."""
        timeout = job.timeout if job.timeout is not None else self.config.job_timeout
        job.started, now = True, self.clock()
        job.deadline = now + timeout if timeout else None
        if job.give_up is not None and (not timeout or job.give_up < timeout):
            job.give_up_at = now + job.give_up

    def batch_limits(self, w: WorkerHandle, job: QueuedJob) -> dict[str, float] | None:
        """The batch limits of ``job``'s task, if its handler takes a batch (the
        worker said so in READY) and the config does not turn it off; None
        for a streamed job."""
        declared = w.batch.get(job.task)
        if declared is None or job.on_chunk is not None:
            return None
        limits = {**declared, **w.spec.batch.get(job.task, {})}
        return limits if limits.get("max_batch", 1) > 1 else None

    def tell_switch(self, sw: Switch, phase: str, **fields: Any) -> None:
        """A phase of ``sw`` for whoever follows the events (nothing is built
        while nobody does)."""
        followers = self.parts.followers
        if not followers:
            return
        why = "restart" if sw.request.restart else "switch" if sw.request.future is not None else "jobs"
        told = {
            "phase": phase,
            "device": self.name,
            "mode": sw.mode,
            "previous": sw.previous,
            "why": why,
            "elapsed": round(self.clock() - sw.started, 3),
        }
        followers.tell("switch", **{**told, **fields})

    def switch_phase(self) -> str:
        """The phase of the switch under way, by the names the events and
        the switch metrics use."""
        sw, w = self._switch_in_progress(), self.worker
        if sw.phase is SwitchPhase.STARTING:
            return "spawn" if w is None or w.state is WorkerState.SPAWNED else "load"
        return "reclaim" if sw.phase is SwitchPhase.RECLAIMING else "stop"

    # ------------------------------------------------------------ a worker's end, decided

    def stop(self, why: str, *, grace: float = 0.0) -> None:
        """Ask the worker to end, on purpose, with nothing running: SIGTERM
        (after ``grace`` seconds if it may still exit by itself), then SIGKILL
        ``stop_timeout`` later."""
        sig = signal.SIGTERM if not grace else None
        self._live_worker().end(Ending(why), sig, self.device_used, self.parts.processes.signal)
        self.parts.deadlines.after(self.key(Deadline.STOP), grace or self.config.stop_timeout)

    def kill(self, why: str, job_error: type[GpuvisorError] = WorkerCrashed, job_id: int | None = None) -> None:
        """End the worker now (SIGKILL): it hangs, ran past a timeout or broke
        the protocol. The job it runs (``job_id``, by default the head) gets
        ``job_error``, saying ``why``; others running with it, ``WorkerCrashed``."""
        w = self._live_worker()
        if job_id is None and w.in_flight:
            job_id = w.in_flight[0].id
        w.end(Ending(why, job_error, job_id), signal.SIGKILL, self.device_used, self.parts.processes.signal)

    def escalate(self) -> None:
        """The STOP deadline: a worker given its grace gets SIGTERM; one still
        there after SIGTERM gets SIGKILL."""
        w = self.worker
        if w is None or w.state is not WorkerState.STOPPING or w.reap():
            return
        if w.signalled is None:
            w.signalled = signal.SIGTERM
            self.parts.processes.signal(w.proc, signal.SIGTERM)
            self.parts.deadlines.after(self.key(Deadline.STOP), self.config.stop_timeout)
            return
        log.warning("worker pid %d ignored SIGTERM for %.1fs; sending SIGKILL", w.pid, self.config.stop_timeout)
        w.signalled = signal.SIGKILL
        self.parts.processes.signal(w.proc, signal.SIGKILL)

    def notice_exit(self) -> None:
        """The worker's pidfd fired (or, without one, a turn passed): reap it.
        With jobs in flight, its last messages may still be on their way:
        they are read until its socket has been quiet a moment."""
        w = self.worker
        if w is None or w.state is WorkerState.EXITED or not w.reap():
            return
        if w.state is not WorkerState.STOPPING and w.ending is None:
            w.used_before, w.stopping_since = self.device_used(), self.clock()
        w.transition(WorkerState.EXITED)
        self.parts.deadlines.clear(self.key(Deadline.STOP))
        if w.in_flight:
            w.last_words_until = self.clock() + LAST_WORDS_MAX_S
            self.parts.deadlines.after(self.key(Deadline.LAST_WORDS), LAST_WORDS_QUIET_S)

    def heard_last_words(self) -> None:
        """A message from the dead worker: wait a little longer for the rest."""
        w = self._live_worker()
        quiet = min(self.clock() + LAST_WORDS_QUIET_S, w.last_words_until)
        self.parts.deadlines.set(self.key(Deadline.LAST_WORDS), quiet)

    def cancel_in_flight(self, error: GpuvisorError) -> int:
        """Shutdown without drain: the jobs handed to the worker fail and it
        is stopped. Returns how many of them were still waiting for an outcome."""
        w, n = self.worker, 0
        if w is None:
            return 0
        for job in w.in_flight:
            n += not job.future.done()
            self.parts.outcomes.add(job.future, error=error)
        w.in_flight.clear()
        if w.state not in (WorkerState.STOPPING, WorkerState.EXITED):
            self.stop("shutdown without drain")
        return n

    # ------------------------------------------------------------ memory

    def device_used(self) -> int | None:
        if self.meter is None:
            return None
        memory = self.meter.memory()
        return memory[0] if memory is not None else None

    def reconfigure(self, old: Config) -> None:
        """A reload: the spare follows the new preload lists (or goes); the
        loaded worker keeps the entry it was loaded with."""
        config = self.config
        self.standby.reconfigure(config)
        if not self.standby_wanted():
            self.standby.stop()  # the reload is answered once the spare is reaped
        w = self.worker
        if w is not None and old.mode(w.mode) != config.mode(w.mode):
            log.warning(
                "mode %r is loaded with its old entry on %s; the new one applies when it is next loaded "
                "(restart() does it now)",
                w.mode,
                self.name,
            )

    def heard_heartbeat(self, w: WorkerHandle, torch_figures: dict | None) -> None:
        self.sample_memory(w, torch_figures)
        self.standby.check()  # now and then: a spare that died idle is let go

    def sample_memory(self, w: WorkerHandle, torch_figures: dict | None) -> None:
        """Once a heartbeat, not once a turn: NVML and /proc reads are cheap,
        but not free, and a busy loop turns thousands of times a second."""
        self.memory = {
            "worker_rss_bytes": process_rss(w.pid),
            "worker_vram_bytes": self.meter.process_bytes(w.pid) if self.meter is not None else None,
            "worker_torch": torch_figures,
        }
        self.gpu = self.meter.snapshot() if self.meter is not None else None


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"
