"""One device's line of workers: the worker now serving it, the jobs handed
to that worker, the mode in force, the switch under way with its reclaim
and spawn, a breaker per mode, the spare and the memory figures.

Everything here runs on the loop thread. This module holds the state and
what follows from it without ending a worker; ``engine.work`` hands the
slot work (which may find its worker must go) and ``engine.ending``
handles a worker's end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from protocol import GpuvisorError, ModeBroken, ModeLoadError
from supervisor.config import Config
from supervisor.engine.budget import Breakers
from supervisor.engine.commands import QueuedJob, QueuedSwitch, Recycle
from supervisor.engine.deadlines import Deadline, Deadlines
from supervisor.engine.devices import DeviceChoice
from supervisor.engine.gpu import GpuMeter, process_rss
from supervisor.engine.link import WorkerLink
from supervisor.engine.process import Processes, worker_argv
from supervisor.engine.queue import JobQueue
from supervisor.engine.standby import StandbyPool
from supervisor.engine.switching import RECLAIM_POLL_S, Gone, Switch, SwitchPhase
from supervisor.engine.worker_handle import HEARTBEATING, SERVING, STARTING, WorkerHandle, WorkerState
from supervisor.metrics import Metrics

log = logging.getLogger("gpuvisor")


class EngineView(Protocol):
    """What a slot uses of the loop that owns it."""

    config: Config
    queue: JobQueue
    deadlines: Deadlines
    link: WorkerLink
    tasks: dict[str, list[str]]
    metrics: Metrics
    processes: Processes
    clock: Callable[[], float]

    slots: list[Slot]
    followers: list

    def tell(self, name: str, **fields: Any) -> None: ...

    def can_serve(self, mode: str) -> bool: ...

    def may_run(self, slot: Slot, mode: str | None) -> bool: ...

    @property
    def shutting_down(self) -> bool: ...

    def decide(self, future: Future | None, *, result: Any = None, error: BaseException | None = None) -> None: ...

    def fail_before_barrier(self, error_for: Callable[[QueuedJob], GpuvisorError | None]) -> None: ...

    def next_generation(self) -> int: ...


class Slot:
    def __init__(self, engine: EngineView, device: DeviceChoice, key: int = 0, name: str = ""):
        self.engine = engine
        self.clock = engine.clock
        self.processes = engine.processes
        self.key = key  # its place in the engine's list: its deadlines carry it
        self._keys = {name: (name, key) for name in Deadline}  # made once: set anew every turn
        self.name = name or device.setting  # what status, metrics and switch_mode(device=) call it
        self.device = device
        meter = GpuMeter.open(device.index) if device.index is not None else device.reason
        self.meter: GpuMeter | None = meter if isinstance(meter, GpuMeter) else None
        self.gpu_unavailable: str | None = None if self.meter is not None else str(meter)
        self.gpu: dict[str, Any] | None = self.meter.snapshot() if self.meter is not None else None
        self.worker: WorkerHandle | None = None
        # The mode in force: loaded, being loaded, or wanted again after its
        # worker died or its last load failed. Only a switch changes it.
        self.mode: str | None = None
        self.mode_served = False  # the mode in force has been READY: a death while reloading it is a respawn's
        self.mode_since = 0.0  # when the mode ahead was last changed (a switch began)
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
        self.breakers = Breakers(engine.config, self.clock)  # a mode that keeps failing here is broken here, alone
        self.standby = StandbyPool(
            engine.link.endpoint, device.env, engine.config, wanted=self.standby_wanted(), clock=self.clock
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
        self.recycle: Recycle | None = None  # the worker goes once the jobs in flight are done (an OOM, unload())

    # ------------------------------------------------------------ what the loop asks

    def at(self, name: Deadline) -> tuple[Deadline, int]:
        return self._keys[name]

    @property
    def config(self):
        return self.engine.config

    @property
    def mode_ahead(self) -> str | None:
        """The mode the next job will find: the switch under way's, else the
        mode in force."""
        return self.switch.mode if self.switch is not None else self.mode

    def serving(self) -> WorkerHandle | None:
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

    def _heavy_switch_ahead(self) -> bool:
        """Jobs (or a switch) wait for a mode other than this slot's that
        would take the spare."""
        here = self.mode_ahead
        return any(mode != here and self.standby.heavy(mode) for mode in self.engine.queue.modes_ahead())

    def standby_wanted(self) -> bool:
        return self.config.warm_standby and not self.config.worker_command

    def refresh_deadlines(self) -> None:
        """The deadlines that follow from the state as it is now, set anew
        each turn: heartbeat, load, the running job, respawn, idle unload."""
        d, w, now, config = self.engine.deadlines, self.worker, self.clock(), self.engine.config
        heartbeat = load = job = None
        if w is not None and w.state not in (WorkerState.STOPPING, WorkerState.EXITED):
            heartbeat = w.last_seen + config.heartbeat_timeout if w.state in HEARTBEATING else None
            load = w.started_at + config.load_timeout if w.state in STARTING else None
            job = min((t for j in self.running(w) for t in j.deadlines()), default=None)
        d.set(self.at(Deadline.HEARTBEAT), heartbeat)
        d.set(self.at(Deadline.LOAD), load)
        d.set(self.at(Deadline.JOB), job)
        respawn_at = self.breakers.of(self.mode).respawn_at if self.mode is not None else 0.0
        backing_off = self.worker is None and self.engine.queue and respawn_at > now
        d.set(self.at(Deadline.RESPAWN), respawn_at if backing_off else None)
        d.set(self.at(Deadline.IDLE_UNLOAD), self._idle_unload_at())
        busy = w is not None and w.state in (WorkerState.SPAWNED, WorkerState.LOADING, WorkerState.BUSY)
        heavy_busy = busy and w is not None and self.standby.heavy(w.spec.name)  # beside a light one, spares import
        coming = self._heavy_switch_ahead()
        d.set(self.at(Deadline.STANDBY_PACE), self.standby.pace(heavy_busy=heavy_busy, now=now, coming=coming))
        if self.standby.stopping and self.at(Deadline.STANDBY_REAP) not in d:
            d.after(self.at(Deadline.STANDBY_REAP), 0.05)  # stopped spares are reaped without waiting on them

    def _idle_unload_at(self) -> float | None:
        """When the idle worker is due to be stopped: only an idle worker with
        nothing queued, never while a job runs or waits."""
        w, e = self.worker, self.engine
        if w is None or w.state is not WorkerState.READY or self.switch or e.shutting_down or self._work_ahead():
            return None
        idle = self.config.idle_unload_for(w.spec)
        return w.idle_since + idle if idle > 0 else None

    def _work_ahead(self) -> bool:
        """Something queued this device may run next, or a switch waits."""
        q = self.engine.queue
        return bool(q) and (q.barrier_queued() or any(self.engine.may_run(self, m) for m in q.modes_ahead()))

    # ------------------------------------------------------------ jobs

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

    def batched(self, jobs: list[QueuedJob]) -> None:
        self.batches["count"] += 1
        self.batches["jobs"] += len(jobs)
        self.batches["largest"] = max(self.batches["largest"], len(jobs))
        self.batches["last"] = len(jobs)

    def running(self, w: WorkerHandle) -> list[QueuedJob]:
        """The jobs the worker has started: the head, or the head's batch."""
        return [job for job in w.in_flight if job.started]

    def finished(self, w: WorkerHandle) -> QueuedJob:
        """The head job answered: the next one starts (unless it has: the
        rest of its batch)."""
        job = w.in_flight.popleft()
        self.jobs_done += 1
        if w.in_flight:
            if not w.in_flight[0].started:
                self.start_clock(w.in_flight[0])
        else:
            self.free_since = self.clock()
            if w.state is WorkerState.BUSY:
                w.transition(WorkerState.READY)
        return job

    # ------------------------------------------------------------ switching

    def current(self) -> WorkerHandle:
        """The worker: the paths that call this run only while there is one."""
        if self.worker is None:
            raise RuntimeError("no worker")
        return self.worker

    def under_way(self) -> Switch:
        """The switch in progress: the phases that call this run only during one."""
        if self.switch is None:
            raise RuntimeError("no switch is under way")
        return self.switch

    def tell_switch(self, sw: Switch, phase: str, **fields: Any) -> None:
        """A phase of ``sw`` for whoever follows the events (nothing is built
        while nobody does)."""
        if not self.engine.followers:
            return
        why = "restart" if sw.request.force else "switch" if sw.request.future is not None else "jobs"
        told = {"phase": phase, "device": self.name, "mode": sw.mode, "previous": sw.previous, "why": why,
                "elapsed": round(self.clock() - sw.started, 3)}  # fmt: skip
        self.engine.tell("switch", **{**told, **fields})

    def switch_phase(self) -> str:
        """The phase of the switch under way, by the names the events and
        the switch metrics use."""
        sw, w = self.under_way(), self.worker
        if sw.phase is SwitchPhase.STARTING:
            return "spawn" if w is None or w.state is WorkerState.SPAWNED else "load"
        return "reclaim" if sw.phase is SwitchPhase.RECLAIMING else "stop"

    def after_stop(self, stopped_here: bool) -> None:
        sw, gone, now = self.under_way(), self.gone, self.clock()
        self.gone = None  # also one that died or was unloaded earlier: its memory too
        sw.stopped(gone, stopped_here, now)
        if gone is not None and self.meter is not None and gone.baseline_used is not None:
            sw.phase, sw.waiting_for = SwitchPhase.RECLAIMING, gone
            sw.reclaim_until = now + self.config.reclaim_timeout
            log.info("switch to mode %r on %s: waiting for the memory of worker pid %d to come back (stopped in %s)",
                     sw.mode, self.name, gone.pid, _secs(sw.stop_seconds))  # fmt: skip
            self.tell_switch(sw, "reclaim", pid=gone.pid, stop_seconds=sw.stop_seconds)
            self.poll_reclaim()
            return
        sw.no_gpu(gone, now)
        self.spawn()

    def poll_reclaim(self) -> None:
        """One NVML reading for the switch waiting on a stopped worker's
        memory; the spawn follows once it is back or ``reclaim_timeout`` has
        passed (logged: another process may have taken memory meanwhile)."""
        sw, now = self.switch, self.clock()
        if sw is None or sw.waiting_for is None or self.meter is None:  # the switch was cancelled meanwhile
            self.engine.deadlines.clear(self.at(Deadline.RECLAIM))
            return
        gone = sw.waiting_for
        tolerance = int(self.config.reclaim_tolerance_mib * 1024 * 1024)
        got = self.meter.poll_reclaim(gone.pid, gone.used_before, gone.baseline_used, tolerance, gone.stopping_since)
        if not got.complete and now < sw.reclaim_until:
            self.engine.deadlines.after(self.at(Deadline.RECLAIM), RECLAIM_POLL_S)
            return
        self.engine.deadlines.clear(self.at(Deadline.RECLAIM))
        sw.reclaimed(got, gone, now)
        self.gpu = self.meter.snapshot()
        self.spawn()

    def spawn(self, standby: bool = True) -> None:
        sw = self.under_way()
        sw.phase = SwitchPhase.STARTING
        spec = self.config.mode(sw.mode)
        if spec is None:  # validated at submit; only a config reload could get here
            self.switch_failed(ModeLoadError(f"mode {sw.mode!r} is no longer in the configuration"), forget=True)
            return
        gen = self.engine.next_generation()
        argv = worker_argv(self.config.worker_command, self.engine.link.endpoint, gen, self.config.heartbeat_interval)
        baseline_used = self.device_used()
        spare = self.standby.take(sw.mode) if standby and self.standby_wanted() else None
        proc = spare.activate(gen, self.config.heartbeat_interval) if spare is not None else None
        sw.standby = proc is not None
        if proc is not None and spare is not None:
            log.info("worker gen %d is the warm standby pid %d (%d modules preloaded)", gen, proc.pid,
                     len(spare.preload))  # fmt: skip
        try:
            proc = proc or self.processes.start(argv, self.device.env)
        except OSError as exc:  # a worker_command that does not exist, say
            self.switch_failed(ModeLoadError(f"could not start a worker with {argv[0]!r}: {exc}"))
            return
        self.worker = WorkerHandle(proc, gen, spec, self.processes.pidfd(proc), self.clock)
        self.worker.baseline_used = baseline_used
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode, self.mode_error = sw.mode, None
        log.info("worker gen %d pid %d starting mode %r", gen, proc.pid, sw.mode)
        if self.engine.followers:
            self.tell_switch(sw, "spawn", pid=proc.pid, gen=gen, standby=sw.standby)
            self.engine.tell("worker_started", pid=proc.pid, gen=gen, mode=sw.mode, device=self.name,
                             standby=sw.standby)  # fmt: skip

    def is_respawn(self) -> bool:
        """The switch only brings back the mode in force, which has served
        since it was put in force, for the jobs waiting on it. A death while
        it loads is retried under the restart budget; a death while loading a
        mode asked for anew fails that switch at once (likely deterministic)."""
        sw = self.switch
        return sw is not None and sw.request.future is None and sw.mode == self.mode and self.mode_served

    def switch_done(self, w: WorkerHandle) -> None:
        sw, self.switch = self.under_way(), None
        self.mode_served, self.turn_since = True, float("inf")
        self.free_since = self.clock()
        self.breakers.of(sw.mode).served()
        log.info("mode %r ready in %.2fs (load %.2fs), worker pid %d; stop %s, spawn %s, warm-up %s", sw.mode,
                 self.clock() - sw.started, w.load_seconds or 0, w.pid, _secs(sw.stop_seconds),
                 _secs(w.hello_at - w.started_at if w.hello_at else None), _secs(w.warmup_seconds))  # fmt: skip
        spawn_seconds = w.hello_at - w.started_at if w.hello_at else None
        result = sw.result(w.pid, w.load_seconds, w.warmup_seconds, spawn_seconds, self.clock())
        self.tell_switch(sw, "ready", **result)
        self.engine.metrics.switched(sw.mode, result)
        self.engine.decide(sw.request.future, result=result)
        if self.standby_wanted() and not self.engine.shutting_down:
            self.standby.prepare()

    def switch_failed(self, error: GpuvisorError, *, forget: bool = False) -> None:
        """The switch did not produce a READY worker. Its request fails, and
        so does every queued job before the next barrier that would run in
        that mode (it names the mode, or names none): a deterministic load
        failure is paid once per burst, not once per job. The mode stays in
        force (unless ``forget``: it no longer exists), so a later job that
        names no mode tries it again; every failed load counts against the
        mode's breaker, so retrying a broken mode ends with the mode broken
        (its jobs failing at once), never in a loop."""
        sw, self.switch = self.under_way(), None
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode = None if forget else sw.mode
        self.mode_error = f"switch to {sw.mode!r} failed: {error.message}"
        log.error("mode %r failed to load: %s", sw.mode, error.message)
        self.tell_switch(sw, "failed", error=error.message)
        self.engine.metrics.switch_failed(sw.mode)
        if sw.request.future is not None:
            self.engine.decide(sw.request.future, error=error)
        held = any(s is not self and s.mode_ahead == sw.mode and not s.breakers.broken(sw.mode)
                   for s in self.engine.slots)  # fmt: skip
        if held:  # another device holds the mode: its jobs go there; this device does not keep it
            self.mode = None
            self.refused[sw.mode] = self.clock() + self.config.restart_window  # nor tries it again at once
        else:
            self.engine.fail_before_barrier(
                lambda job: (
                    ModeLoadError(
                        f"job {job.id} needs mode {sw.mode!r}, which failed to load: {error.message}", **error.details
                    )
                    if (job.mode or sw.mode) == sw.mode
                    else None
                )
            )
        if not forget:
            self.count_death(sw.mode, f"it failed to load: {error.message}")

    def refuse_switch(self, request: QueuedSwitch, error: ModeLoadError) -> None:
        """A switch to a mode whose loader cannot be imported, found before
        anything was stopped: it fails, and so do the queued jobs that
        would run in that mode, as for a failed load; the worker that
        serves, and the mode in force, stay as they are. It counts against
        the mode's breaker like any failed load."""
        mode = request.mode
        if mode is None:
            raise RuntimeError("a refused switch names its mode")
        log.error("mode %r cannot be loaded (its worker was not stopped): %s", mode, error.message)
        why = "restart" if request.force else "switch" if request.future is not None else "jobs"
        self.engine.tell("switch", phase="failed", device=self.name, mode=mode, previous=self.mode, why=why,
                         elapsed=0.0, error=error.message)  # fmt: skip
        self.engine.metrics.switch_failed(mode)
        if request.future is not None:
            self.engine.decide(request.future, error=error)
        self.engine.fail_before_barrier(
            lambda job: (
                ModeLoadError(f"job {job.id} needs mode {mode!r}, which failed to load: {error.message}")
                if job.mode == mode
                else None
            )
        )
        self.count_death(mode, f"it cannot be loaded: {error.message}")

    def count_death(self, mode: str, what: str) -> None:
        """A death (or a failed load) against ``mode``'s breaker here; when
        it breaks, the queued jobs of ``mode`` that no other device may run
        fail at once. Other modes are not touched."""
        if self.breakers.of(mode).count(what):
            self.engine.fail_before_barrier(
                lambda job: self.broken_error(mode) if job.mode == mode and not self.engine.can_serve(mode) else None
            )

    def broken_error(self, mode: str) -> ModeBroken:
        """What a job of ``mode`` gets while the mode is broken here."""
        budget = self.breakers.of(mode)
        retry_in = budget.retry_in()
        return ModeBroken(f"mode {mode!r} is broken: {budget.failed}", mode=mode,
                          retry_in=None if retry_in is None else round(retry_in, 1))  # fmt: skip

    def failed_reason(self) -> str | None:
        """Why this device cannot serve its mode in force: the mode is broken here."""
        mode = self.mode
        return self.breakers.of(mode).failed if mode is not None and self.breakers.broken(mode) else None

    def broken_modes(self) -> dict[str, dict[str, Any]]:
        """The modes broken on this device: why, and when each is tried
        again (seconds from the snapshot; None: only an operator's word)."""
        out = {}
        for budget in self.breakers.tripped():
            retry_in = budget.retry_in()
            out[budget.mode] = {"reason": budget.failed, "retry_in_s": None if retry_in is None else round(retry_in, 1)}
        return out

    # ------------------------------------------------------------ status

    def describe(self) -> dict[str, Any]:
        """This device in the status: its worker, its counters, its memory."""
        w, sw = self.worker, self.switch
        return {
            "name": self.name,
            "mode": w.mode if w is not None and w.state in SERVING else None,
            "worker_state": w.state.value if w is not None else "none",
            "worker_pid": w.pid if w is not None else None,
            "in_flight": len(w.in_flight) if w is not None else 0,
            "restarts": self.restarts,
            "jobs_done": self.jobs_done,
            "switching_to": sw.mode if sw is not None else None,
            "reclaiming": sw is not None and sw.waiting_for is not None,
            "standby_pid": self.standby.pid,
            "standby_ready": self.standby.ready,
            "standby_paused": self.standby.paused,
            "last_error": self.mode_error,
            "failed_reason": self.failed_reason(),
            "broken": self.broken_modes(),
            "idle_unloaded": self.idle_unloaded,
            "oom_recycles": self.oom_recycles,
            "batches": dict(self.batches),
            "device": self.device.kind if self.device.index is None else f"cuda:{self.device.index}",
            "gpu_unavailable": self.gpu_unavailable,
            "worker_rss_bytes": self.memory.get("worker_rss_bytes"),
            "worker_vram_bytes": self.memory.get("worker_vram_bytes"),
            "worker_torch": self.memory.get("worker_torch"),
            "gpu": self.gpu,
        }

    # ------------------------------------------------------------ memory

    def device_used(self) -> int | None:
        if self.meter is None:
            return None
        memory = self.meter.memory()
        return memory[0] if memory is not None else None

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
