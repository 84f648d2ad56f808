"""One device's line of workers: the worker now serving it, the jobs handed
to that worker, the switch under way, the restart budget and the spare.

Everything here runs on the loop thread, in the phases the loop calls it
from. Nothing in a message handler or a deadline ends a worker: they
``stop()`` it (SIGTERM, then SIGKILL at a deadline) or ``kill()`` it
(SIGKILL now), recording why, and go on. The worker's pidfd then fires,
``notice_exit()`` reaps it, its last messages are read until its socket is
quiet, and ``conclude()`` handles its end, once, in its own phase: the job
it was running gets its outcome, the jobs it had not started go back to the
queue, and the restart budget counts the death.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from protocol import (
    Drain,
    GpuvisorError,
    JobTimeout,
    Load,
    ModeLoadError,
    SupervisorFailed,
    WorkerCrashed,
    encode,
)
from supervisor.engine.budget import RestartBudget
from supervisor.engine.commands import QueuedJob, QueuedSwitch
from supervisor.engine.deadlines import Deadline
from supervisor.engine.devices import DeviceChoice
from supervisor.engine.gpu import GpuMeter, process_rss
from supervisor.engine.process import describe_exit, signal_group, spawn_worker, worker_argv
from supervisor.engine.standby import StandbyPool
from supervisor.engine.switching import RECLAIM_POLL_S, Gone, Switch, SwitchPhase
from supervisor.engine.worker_handle import HEARTBEATING, STARTING, Ending, WorkerHandle, WorkerState

if TYPE_CHECKING:
    from supervisor.engine.loop import Engine

log = logging.getLogger("gpuvisor")

LAST_WORDS_QUIET_S = 0.02  # after a death: the worker's socket quiet this long means all it sent is in
LAST_WORDS_MAX_S = 0.5


class Slot:
    def __init__(self, engine: Engine, device: DeviceChoice, key: int = 0):
        self.engine = engine
        self.key = key
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
        self.mode_error: str | None = None  # why the mode in force is not loaded, after a failed switch
        self.switch: Switch | None = None
        self.gone: Gone | None = None  # the last worker, until its memory is verified back
        self.budget = RestartBudget(engine.config)
        self.standby = StandbyPool(engine.link.endpoint, device.env)
        self.restarts = 0
        self.jobs_done = 0
        self.memory: dict[str, Any] = {}  # the worker's memory at the last heartbeat
        self.idle_unloaded: str | None = None  # the mode idle_unload_s stopped, until it loads again
        self.oom_recycles = 0
        self.recycle = False  # an OOM asked for a fresh worker once the jobs in flight are done

    # ------------------------------------------------------------ what the loop asks

    def _at(self, name: Deadline) -> tuple[Deadline, int]:
        return (name, self.key)

    @property
    def config(self):
        return self.engine.config

    def serving(self) -> WorkerHandle | None:
        """The worker, if it can be handed jobs now."""
        w = self.worker
        if w is None or w.state not in (WorkerState.READY, WorkerState.BUSY) or self.switch is not None:
            return None
        return w

    def idle(self) -> bool:
        return self.worker is None and self.switch is None

    def standby_wanted(self) -> bool:
        return self.config.warm_standby and not self.config.worker_command

    def refresh_deadlines(self) -> None:
        """The deadlines that follow from the state as it is now, set anew
        each turn: heartbeat, load, the running job, respawn, idle unload."""
        d, w, now = self.engine.deadlines, self.worker, time.monotonic()
        alive = w is not None and w.state not in (WorkerState.STOPPING, WorkerState.EXITED)
        d.set(self._at(Deadline.HEARTBEAT), w.last_seen + self.config.heartbeat_timeout
              if alive and w.state in HEARTBEATING else None)  # fmt: skip
        d.set(
            self._at(Deadline.LOAD), w.started_at + self.config.load_timeout if alive and w.state in STARTING else None
        )
        d.set(self._at(Deadline.JOB), w.in_flight[0].deadline if alive and w.in_flight else None)
        backing_off = self.worker is None and self.engine.queue and self.budget.respawn_at > now
        d.set(self._at(Deadline.RESPAWN), self.budget.respawn_at if backing_off else None)
        d.set(self._at(Deadline.IDLE_UNLOAD), self._idle_unload_at())
        if self.standby.stopping and self._at(Deadline.STANDBY_REAP) not in d:
            d.after(self._at(Deadline.STANDBY_REAP), 0.05)  # stopped spares are reaped without waiting on them

    def _idle_unload_at(self) -> float | None:
        """When the idle worker is due to be stopped: only an idle worker with
        nothing queued, never while a job runs or waits."""
        w, e = self.worker, self.engine
        if w is None or w.state is not WorkerState.READY or e.queue or self.switch or e.shutting_down:
            return None
        idle = self.config.idle_unload_for(w.spec)
        return w.idle_since + idle if idle > 0 else None

    # ------------------------------------------------------------ jobs

    def dispatch(self, job: QueuedJob, w: WorkerHandle) -> bool:
        """Send ``job`` to ``w``; False if ``w`` turned out to be lost (the job
        then goes back to the queue when its end is handled)."""
        # RUNNING from here on, so cancel() says False for a job that may run.
        if not job.future.running() and not job.future.set_running_or_notify_cancel():
            return True
        if not self.engine.link.send(w.identity, job.frames):
            w.unsent.append(job)
            self.kill("stopped taking messages")
            return False
        if w.state is WorkerState.READY:
            w.transition(WorkerState.BUSY)
        w.in_flight.append(job)
        if len(w.in_flight) == 1:
            self._start_clock(job)
        return True

    def _start_clock(self, job: QueuedJob) -> None:
        """A job's timeout counts from when it reaches the head of the jobs in
        flight: that is when the worker, which runs them in order, starts it."""
        timeout = job.timeout if job.timeout is not None else self.config.job_timeout
        job.deadline = time.monotonic() + timeout if timeout else None

    def finished(self, w: WorkerHandle) -> QueuedJob:
        """The head job answered: the next one starts."""
        job = w.in_flight.popleft()
        self.jobs_done += 1
        if w.in_flight:
            self._start_clock(w.in_flight[0])
        elif w.state is WorkerState.BUSY:
            w.transition(WorkerState.READY)
        return job

    def drain(self) -> None:
        """Shutdown: nothing is queued or in flight; DRAIN tells the worker to
        finish and exit 0."""
        w = self.worker
        if w is not None and w.state is WorkerState.READY:
            if not self.engine.link.send(w.identity, encode(Drain())):
                self.kill("stopped taking messages")
                return
            w.transition(WorkerState.DRAINING)
            self.engine.deadlines.after(self._at(Deadline.EXIT), self.config.stop_timeout)

    def recycle_if_due(self, *then: tuple) -> None:
        """After an OOM: stop the worker once the jobs handed to it are done
        (``then``: outcomes to hand out once it is gone)."""
        if self.recycle and self.worker is not None and not self.worker.in_flight:
            self.recycle = False
            self.stop("recycling after out of memory", then=list(then))  # the mode stays in force
        else:
            for future, result, error in then:
                self.engine.decide(future, result=result, error=error)

    # ------------------------------------------------------------ switching

    def begin_switch(self, request: QueuedSwitch) -> None:
        """Stop the worker, wait (never blocking the loop) until it is reaped
        and its memory is back, then spawn the new one."""
        if request.future is not None and not request.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        w = self.worker
        self.switch = Switch(request.mode, request, w.mode if w is not None else None)
        self.idle_unloaded = None
        if w is None:
            self._after_stop(stopped_here=False)
        elif w.state is not WorkerState.STOPPING:
            self.stop(f"switching to mode {request.mode!r}")

    def _after_stop(self, stopped_here: bool) -> None:
        sw, gone, now = self.switch, self.gone, time.monotonic()
        self.gone = None  # also one that died or was unloaded earlier: its memory too
        sw.stopped(gone, stopped_here)
        if gone is not None and self.meter is not None and gone.baseline_used is not None:
            sw.phase, sw.waiting_for = SwitchPhase.RECLAIMING, gone
            sw.reclaim_until = now + self.config.reclaim_timeout
            self.poll_reclaim()
            return
        sw.no_gpu(gone, now)
        self._spawn()

    def poll_reclaim(self) -> None:
        """One NVML reading for the switch waiting on a stopped worker's
        memory; the spawn follows once it is back or ``reclaim_timeout`` has
        passed (logged: another process may have taken memory meanwhile)."""
        sw, now = self.switch, time.monotonic()
        if sw is None or sw.waiting_for is None:  # the switch was cancelled meanwhile
            self.engine.deadlines.clear(self._at(Deadline.RECLAIM))
            return
        gone = sw.waiting_for
        tolerance = int(self.config.reclaim_tolerance_mib * 1024 * 1024)
        got = self.meter.poll_reclaim(gone.pid, gone.used_before, gone.baseline_used, tolerance, gone.stopping_since)
        if not got.complete and now < sw.reclaim_until:
            self.engine.deadlines.after(self._at(Deadline.RECLAIM), RECLAIM_POLL_S)
            return
        self.engine.deadlines.clear(self._at(Deadline.RECLAIM))
        sw.reclaimed(got, now)
        self.gpu = self.meter.snapshot()
        self._spawn()

    def _spawn(self, standby: bool = True) -> None:
        sw = self.switch
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
        if proc is not None:
            log.info("worker gen %d is the warm standby pid %d (%d modules preloaded)", gen, proc.pid,
                     len(spare.preload))  # fmt: skip
        try:
            proc = proc or spawn_worker(argv, self.device.env)
        except OSError as exc:  # a worker_command that does not exist, say
            self.switch_failed(ModeLoadError(f"could not start a worker with {argv[0]!r}: {exc}"))
            return
        self.worker = WorkerHandle(proc, gen, spec)
        self.worker.baseline_used = baseline_used
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode, self.mode_error = sw.mode, None
        log.info("worker gen %d pid %d starting mode %r", gen, proc.pid, sw.mode)

    def is_respawn(self) -> bool:
        """The switch only brings back the mode in force, which has served
        since it was put in force, for the jobs waiting on it. A death while
        it loads is retried under the restart budget; a death while loading a
        mode asked for anew fails that switch at once (likely deterministic)."""
        sw = self.switch
        return sw is not None and sw.request.future is None and sw.mode == self.mode and self.mode_served

    def switch_done(self, w: WorkerHandle) -> None:
        sw, self.switch = self.switch, None
        self.mode_served = True
        log.info("mode %r ready in %.2fs (load %.2fs), worker pid %d", sw.mode, time.monotonic() - sw.started,
                 w.load_seconds or 0, w.pid)  # fmt: skip
        if sw.request.future is not None:
            spawn_seconds = w.hello_at - w.started_at if w.hello_at else None
            self.engine.decide(
                sw.request.future, result=sw.result(w.pid, w.load_seconds, w.warmup_seconds, spawn_seconds)
            )
        if self.standby_wanted() and not self.engine.shutting_down:
            self.standby.prepare()

    def load_failed(self, error: ModeLoadError) -> None:
        """The loader raised. The switch fails once the worker is reaped (it
        exits 3 by itself; its own word goes in the log), so that a caller
        who sees the failure sees no worker in the status either."""
        self.switch.failure = error
        self.stop("its mode failed to load", grace=1.0)

    def switch_failed(self, error: GpuvisorError, *, forget: bool = False) -> None:
        """The switch did not produce a READY worker. Its request fails, and
        so does every queued job before the next barrier that would run in
        that mode (it names the mode, or names none): a deterministic load
        failure is paid once per burst, not once per job. The mode stays in
        force (unless ``forget``: it no longer exists), so a later job that
        names no mode tries it again; every failed load counts against the
        restart budget, so retrying a broken mode ends in ``failed``, never
        in a loop."""
        sw, self.switch = self.switch, None
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode = None if forget else sw.mode
        self.mode_error = f"switch to {sw.mode!r} failed: {error.message}"
        log.error("mode %r failed to load: %s", sw.mode, error.message)
        if sw.request.future is not None:
            self.engine.decide(sw.request.future, error=error)
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
            self.count_death(f"mode {sw.mode!r} failed to load: {error.message}")

    # ------------------------------------------------------------ a worker's end

    def stop(self, why: str, *, grace: float = 0.0, then: list | None = None) -> None:
        """Ask the worker to end, on purpose, with nothing running: SIGTERM
        (after ``grace`` seconds if it may still exit by itself), then SIGKILL
        ``stop_timeout`` later. ``then``: outcomes that wait until it is gone."""
        self._end(Ending(why, then=then or []), signal.SIGTERM if not grace else None)
        self.engine.deadlines.after(self._at(Deadline.STOP), grace or self.config.stop_timeout)

    def kill(self, why: str, job_error: type[GpuvisorError] = WorkerCrashed) -> None:
        """End the worker now (SIGKILL): it hangs, ran past a timeout or broke
        the protocol. The job it runs gets ``job_error``, saying ``why``."""
        head = self.worker.in_flight[0] if self.worker.in_flight else None
        self._end(Ending(why, job_error, head.id if head is not None else None), signal.SIGKILL)

    def _end(self, ending: Ending, sig: signal.Signals | None) -> None:
        w = self.worker
        if w.state is WorkerState.EXITED:
            return
        if w.state is not WorkerState.STOPPING:
            w.ending, w.used_before, w.stopping_since = ending, self.device_used(), time.monotonic()
            w.transition(WorkerState.STOPPING)
        elif sig is signal.SIGKILL and w.ending is not None and w.ending.job_error is None:
            w.ending = ending  # a stop turned into a kill: the new reason is the one that matters
        if sig is not None:
            w.signalled = sig
            signal_group(w.proc, sig)

    def escalate(self) -> None:
        """The STOP deadline: a worker given its grace gets SIGTERM; one still
        there after SIGTERM gets SIGKILL."""
        w = self.worker
        if w is None or w.state is not WorkerState.STOPPING or w.reap():
            return
        if w.signalled is None:
            w.signalled = signal.SIGTERM
            signal_group(w.proc, signal.SIGTERM)
            self.engine.deadlines.after(self._at(Deadline.STOP), self.config.stop_timeout)
            return
        log.warning("worker pid %d ignored SIGTERM for %.1fs; sending SIGKILL", w.pid, self.config.stop_timeout)
        w.signalled = signal.SIGKILL
        signal_group(w.proc, signal.SIGKILL)

    def notice_exit(self) -> None:
        """The worker's pidfd fired (or, without one, a turn passed): reap it.
        With jobs in flight, its last messages may still be on their way:
        they are read until its socket has been quiet a moment."""
        w = self.worker
        if w is None or w.state is WorkerState.EXITED or not w.reap():
            return
        if w.state is not WorkerState.STOPPING and w.ending is None:
            w.used_before, w.stopping_since = self.device_used(), time.monotonic()
        w.transition(WorkerState.EXITED)
        self.engine.deadlines.clear(self._at(Deadline.STOP))
        if w.in_flight:
            w.last_words_until = time.monotonic() + LAST_WORDS_MAX_S
            self.engine.deadlines.after(self._at(Deadline.LAST_WORDS), LAST_WORDS_QUIET_S)

    def heard_last_words(self) -> None:
        """A message from the dead worker: wait a little longer for the rest."""
        w = self.worker
        quiet = min(time.monotonic() + LAST_WORDS_QUIET_S, w.last_words_until)
        self.engine.deadlines.set(self._at(Deadline.LAST_WORDS), quiet)

    def conclude(self) -> None:
        """The one place a worker's end is handled; a no-op until it is
        reaped and its last words are in."""
        w = self.worker
        if w is None or w.state is not WorkerState.EXITED or self._at(Deadline.LAST_WORDS) in self.engine.deadlines:
            return
        for name in (Deadline.HEARTBEAT, Deadline.LOAD, Deadline.JOB, Deadline.EXIT):
            self.engine.deadlines.clear(self._at(name))
        self.worker, self.recycle = None, False  # whatever ended it, the next worker is fresh
        self.gone = Gone(w.pid, w.baseline_used, w.used_before, self.memory.get("worker_rss_bytes"), w.stopping_since)
        self.memory = {}
        w.close_fds()  # reads the last of its stderr
        code, ending, ended_in = w.returncode, w.ending, w.ended_in
        for future, result, error in ending.then if ending is not None else ():
            self.engine.decide(future, result=result, error=error)
        tail = w.stderr_tail()
        said = ("; its last stderr lines:\n    " + "\n    ".join(tail)) if tail else ""
        if ended_in is WorkerState.DRAINING:
            log.info("worker gen %d pid %d drained and %s", w.gen, w.pid, describe_exit(code))
            return
        if ending is not None and ending.job_error is None:  # we stopped it, idle, on purpose
            log.info("worker gen %d pid %d stopped (%s): %s", w.gen, w.pid, ending.why, describe_exit(code))
            self.engine.queue.put_back(w.unsent)
            if self.switch is not None and self.switch.failure is not None:
                self.switch_failed(self.switch.failure)
            elif self.switch is not None and self.switch.phase is SwitchPhase.STOPPING:
                self._after_stop(stopped_here=True)
            return
        how = ending.why if ending is not None else describe_exit(code, loading=ended_in in STARTING)
        log.error("worker gen %d pid %d %s (state %s)", w.gen, w.pid, how, ended_in.value)
        if ended_in in STARTING:
            self._died_loading(w, f"worker pid {w.pid} {how} while loading mode {w.mode!r}", said, tail)
            return
        self.restarts += 1
        job = w.in_flight.popleft() if w.in_flight else None
        self.engine.queue.put_back([*w.in_flight, *w.unsent])  # not started: they keep their place
        job_error = ending.job_error if ending is not None else WorkerCrashed
        if ending is not None and ending.job_id is not None and (job is None or job.id != ending.job_id):
            # The job the cause was about answered in its last words; this one
            # was merely running when it was killed.
            how, job_error = f"was killed while running the next job ({ending.why})", WorkerCrashed
        self.count_death(f"worker pid {w.pid} (mode {w.mode!r}) {how}")  # may enter the failed state
        if job is None:
            return
        if job_error is WorkerCrashed and job.retries > 0 and self.budget.failed is None:
            job.retries -= 1
            log.warning("job %d (%r) will run again (%d retries left)", job.id, job.task, job.retries)
            self.engine.queue.put_back([job])  # first in line, as it was
            return
        message = f"worker pid {w.pid} (mode {w.mode!r}) {how} while running job {job.id} ({job.task!r}){said}"
        if self.budget.failed is not None:
            message += "; the restart budget is exhausted, so it was not retried"
        self.engine.decide(job.future, error=job_error(message, stderr_tail=tail))

    def _died_loading(self, w: WorkerHandle, what: str, said: str, tail: list[str]) -> None:
        if self.switch is None:  # its LOAD_FAILED already failed the switch
            return
        if self.switch.standby and w.ended_in is WorkerState.SPAWNED and w.ending is None:
            # A spare that died before it said HELLO (killed while idle, just
            # as it was taken): not the mode's fault. A fresh process instead.
            log.warning("the warm standby taken as worker gen %d was already dead; starting a fresh worker", w.gen)
            self._spawn(standby=False)
            return
        if self.is_respawn():
            # The mode was serving and is still wanted: an OOM kill or an
            # operator's kill during a reload is a death like any other. The
            # jobs wait for the next respawn, after the backoff.
            self.switch = None
            self.restarts += 1
            self.count_death(what)  # may enter the failed state, which fails them
            return
        self.switch_failed(ModeLoadError(f"{what}{said}", stderr_tail=tail))

    def count_death(self, what: str) -> None:
        if self.budget.count(what):
            self.engine.fail_before_barrier(lambda job: self.failed_error())

    def failed_error(self) -> SupervisorFailed:
        return SupervisorFailed(f"the supervisor is failed: {self.budget.failed}")

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

    def on_deadline(self, name: Deadline) -> None:
        """A deadline of this slot fired (the loop's deadline phase)."""
        d, w, now = self.engine.deadlines, self.worker, time.monotonic()
        if name is Deadline.RECLAIM:
            self.poll_reclaim()
        elif name is Deadline.STOP:
            d.clear(self._at(name))
            self.escalate()
        elif name is Deadline.LAST_WORDS:
            d.clear(self._at(name))
        elif name is Deadline.RESPAWN:
            d.clear(self._at(name))  # the pump sees the backoff is over
        elif name is Deadline.STANDBY_REAP:
            d.clear(self._at(name))
            self.standby.reap()
        elif w is None or w.state in (WorkerState.STOPPING, WorkerState.EXITED):
            d.clear(self._at(name))
        elif name is Deadline.JOB:
            job = w.in_flight[0]
            limit = job.timeout or self.config.job_timeout
            self.kill(f"was killed: the job ran past its {limit:g}s timeout", JobTimeout)
        elif name is Deadline.LOAD:
            self.kill(f"did not say READY within load_timeout={self.config.load_timeout:g}s")
        elif name is Deadline.HEARTBEAT:
            self.kill(f"hung: no message for {now - w.last_seen:.1f}s "
                      f"(heartbeat_timeout={self.config.heartbeat_timeout:g}s)")  # fmt: skip
        elif name is Deadline.EXIT:
            d.clear(self._at(name))
            log.warning("worker pid %d did not exit within %gs of DRAIN", w.pid, self.config.stop_timeout)
            self.stop("drain took too long")
        elif name is Deadline.IDLE_UNLOAD:
            mode = w.mode
            self.stop(f"idle for {self.config.idle_unload_for(w.spec):g}s (idle_unload_s)")
            self.idle_unloaded = mode  # the mode stays in force: the next job loads it again

    def send_load(self, w: WorkerHandle) -> None:
        spec = w.spec
        load = Load(spec.name, spec.loader, spec.args, spec.warmup, list(self.config.loader_path) or None)
        if self.engine.link.send(w.identity, encode(load)):
            w.transition(WorkerState.LOADING)
        else:
            self.kill("stopped taking messages")
