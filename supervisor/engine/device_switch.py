"""A device's switch, from stopping the old worker to the new one's READY:
the reclaim of its memory between, the one place a worker is spawned, and
what a failed switch costs (its request, the queued jobs of its mode, the
mode's breaker). A layer of ``device.Device`` (see ``device_state``).
"""

from __future__ import annotations

import logging

from protocol import GpuvisorError, ModeLoadError, NoModeLoaded, Ready, encode
from protocol.messages import Load
from supervisor.engine import placement
from supervisor.engine.commands import QueuedJob, QueuedSwitch
from supervisor.engine.deadlines import Deadline
from supervisor.engine.device_state import DeviceState, _secs
from supervisor.engine.preflight import loader_problem
from supervisor.engine.process import worker_argv
from supervisor.engine.switching import RECLAIM_POLL_S, Switch, SwitchPhase
from supervisor.engine.worker_handle import WorkerHandle, WorkerState
from supervisor.status import already_loaded

log = logging.getLogger("gpuvisor")


class DeviceSwitching(DeviceState):
    # ------------------------------------------------------------ switching

    def answer_barrier(self, item: QueuedSwitch) -> bool:
        """An explicit switch or restart at the head, for this device. False:
        it must wait (the pump stops for now); True: it was answered or
        begun."""
        queue, outcomes = self.parts.queue, self.parts.outcomes
        w = self.worker
        same_mode = item.mode in (None, self.mode)
        target = item.mode or self.mode
        budget = self.breakers.of(target) if target is not None else None
        if (
            budget is not None
            and budget.failed is None
            and not item.restart
            and same_mode
            and w is None
            and budget.backing_off()
        ):
            return False  # a same-mode switch is a respawn: it waits out the backoff like one
        queue.take(item)
        if budget is not None and (budget.failed is not None or item.restart or not same_mode):
            budget.reset()  # an operator's word (a broken mode tried now, restart()) or a new mode: a fresh budget
        if item.mode is None:  # restart() of whatever mode is in force
            if self.mode is None:
                outcomes.add(item.future, error=NoModeLoaded("restart(): no mode is loaded; call switch_mode()"))
                return True
            item.mode = self.mode
        if not item.restart and w is not None and w.state is WorkerState.READY and w.mode == item.mode:
            self.put_in_force()
            outcomes.add(item.future, result=already_loaded(item.mode, w.pid))
            return True
        self.begin_switch(item)
        return False

    def put_in_force(self) -> None:
        """A caller's word that the mode here is the one its next jobs want
        (a switch to it answered ``already_loaded``)."""
        self.mode_since = self.clock()

    def begin_switch(self, request: QueuedSwitch) -> None:
        """Stop the worker, wait (never blocking the loop) until it is reaped
        and its memory is back, then spawn the new one."""
        if request.future is not None and not request.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        if request.mode is None:
            raise RuntimeError("a switch begins with its mode known (restart() of no mode is answered before)")
        w = self.worker
        spec = self.config.mode(request.mode)
        respawn = request.future is None and request.mode == self.mode and self.mode_served
        if spec is not None and not respawn and not self.config.worker_command:
            problem = loader_problem(spec.loader, self.config.loader_path)
            if problem is not None:  # the worker that serves is left as it is
                self.refuse_switch(request, ModeLoadError(f"mode {request.mode!r}: {problem}"))
                return
        self.switch = Switch(request.mode, request, w.mode if w is not None else None, self.clock())
        if placement.puts_in_force(request, self):
            self.mode_since = self.clock()
        self.idle_unloaded = None
        if w is None:
            self.after_stop(stopped_here=False)
            return
        log.info("switching %s from mode %r to %r: stopping worker pid %d", self.name, w.mode, request.mode, w.pid)
        self.tell_switch(self.switch, "stop", pid=w.pid)
        if w.state is not WorkerState.STOPPING:
            self.stop(f"switching to mode {request.mode!r}")

    def cancel_switch(self, error: GpuvisorError) -> None:
        """Shutdown without drain: the switch under way fails."""
        if self.switch is not None:
            self.parts.outcomes.add(self.switch.request.future, error=error)
            self.tell_switch(self.switch, "failed", error=error.message)
            self.switch = None

    def after_stop(self, stopped_here: bool) -> None:
        sw, gone, now = self._switch_in_progress(), self.gone, self.clock()
        self.gone = None  # also one that died or was unloaded earlier: its memory too
        sw.stopped(gone, stopped_here, now)
        if gone is not None and self.meter is not None and gone.baseline_used is not None:
            sw.phase, sw.waiting_for = SwitchPhase.RECLAIMING, gone
            sw.reclaim_until = now + self.config.reclaim_timeout
            log.info(
                "switch to mode %r on %s: waiting for the memory of worker pid %d to come back (stopped in %s)",
                sw.mode,
                self.name,
                gone.pid,
                _secs(sw.stop_seconds),
            )
            self.tell_switch(sw, "reclaim", pid=gone.pid, stop_seconds=sw.stop_seconds)
            self.poll_reclaim()
            return
        sw.no_gpu(gone, now)
        self._spawn()

    def poll_reclaim(self) -> None:
        """One NVML reading for the switch waiting on a stopped worker's
        memory; the spawn follows once it is back or ``reclaim_timeout`` has
        passed (logged: another process may have taken memory meanwhile)."""
        sw, now, deadlines = self.switch, self.clock(), self.parts.deadlines
        if sw is None or sw.waiting_for is None or self.meter is None:  # the switch was cancelled meanwhile
            deadlines.clear(self.key(Deadline.RECLAIM))
            return
        gone = sw.waiting_for
        tolerance = int(self.config.reclaim_tolerance_mib * 1024 * 1024)
        got = self.meter.poll_reclaim(gone.pid, gone.used_before, gone.baseline_used, tolerance, gone.stopping_since)
        if not got.complete and now < sw.reclaim_until:
            deadlines.after(self.key(Deadline.RECLAIM), RECLAIM_POLL_S)
            return
        deadlines.clear(self.key(Deadline.RECLAIM))
        sw.reclaimed(got, gone, now)
        self.gpu = self.meter.snapshot()
        self._spawn()

    def _spawn(self, standby: bool = True) -> None:
        """The one place a worker starts: the switch under way's."""
        sw, parts, config = self._switch_in_progress(), self.parts, self.config
        sw.phase = SwitchPhase.STARTING
        spec = config.mode(sw.mode)
        if spec is None:  # validated at submit; only a config reload could get here
            self.switch_failed(ModeLoadError(f"mode {sw.mode!r} is no longer in the configuration"), forget=True)
            return
        parts.generation += 1
        gen = parts.generation
        argv = worker_argv(config.worker_command, parts.link.endpoint, gen, config.heartbeat_interval)
        baseline_used = self.device_used()
        spare = self.standby.take(sw.mode) if standby and self.standby_wanted() else None
        proc = spare.activate(gen, config.heartbeat_interval) if spare is not None else None
        sw.standby = proc is not None
        if proc is not None and spare is not None:
            log.info(
                "worker gen %d is the warm standby pid %d (%d modules preloaded)", gen, proc.pid, len(spare.preload)
            )
        try:
            proc = proc or parts.processes.start(argv, self.choice.env)
        except OSError as exc:  # a worker_command that does not exist, say
            self.switch_failed(ModeLoadError(f"could not start a worker with {argv[0]!r}: {exc}"))
            return
        self.worker = WorkerHandle(proc, gen, spec, parts.processes.pidfd(proc), self.clock)
        self.worker.baseline_used = baseline_used
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode, self.mode_error = sw.mode, None
        log.info("worker gen %d pid %d starting mode %r", gen, proc.pid, sw.mode)
        if parts.followers:
            self.tell_switch(sw, "spawn", pid=proc.pid, gen=gen, standby=sw.standby)
            parts.followers.tell(
                "worker_started", pid=proc.pid, gen=gen, mode=sw.mode, device=self.name, standby=sw.standby
            )

    def said_hello(self, w: WorkerHandle) -> None:
        """Its HELLO: it is up; LOAD tells it its mode."""
        w.hello_at = self.clock()
        spec = w.spec
        load = Load(spec.name, spec.loader, spec.args, spec.warmup, list(self.config.loader_path) or None)
        if not self.parts.link.send(w.identity, encode(load)):
            self.kill("stopped taking messages")
            return
        w.transition(WorkerState.LOADING)
        spawn_seconds = w.hello_at - w.started_at
        log.info("worker pid %d up in %.2fs; loading mode %r", w.pid, spawn_seconds, spec.name)
        if self.switch is not None:
            self.tell_switch(self.switch, "load", pid=w.pid, spawn_seconds=spawn_seconds)

    def is_respawn(self) -> bool:
        """The switch only brings back the mode in force, which has served
        since it was put in force, for the jobs waiting on it. A death while
        it loads is retried under the restart budget; a death while loading a
        mode asked for anew fails that switch at once (likely deterministic)."""
        sw = self.switch
        return sw is not None and sw.request.future is None and sw.mode == self.mode and self.mode_served

    def switch_done(self, w: WorkerHandle, ready: Ready, batch: dict[str, dict[str, float]]) -> None:
        """Its READY: the switch is over, with what it cost; what the worker
        said of its mode (tasks, batch handlers, heavy imports) is kept."""
        w.load_seconds = float(ready.load_seconds)
        w.batch = batch
        w.warmup_seconds = ready.warmup_seconds
        self.standby.learn(ready.mode, ready.imported)
        self.parts.tasks[ready.mode] = sorted(t for t in ready.tasks if isinstance(t, str))
        w.transition(WorkerState.READY)
        self.sample_memory(w, ready.memory)
        sw, self.switch = self._switch_in_progress(), None
        self.mode_served, self.turn_since = True, float("inf")
        self.free_since = now = self.clock()
        self.breakers.of(sw.mode).served()
        log.info(
            "mode %r ready in %.2fs (load %.2fs), worker pid %d; stop %s, spawn %s, warm-up %s",
            sw.mode,
            now - sw.started,
            w.load_seconds or 0,
            w.pid,
            _secs(sw.stop_seconds),
            _secs(w.hello_at - w.started_at if w.hello_at else None),
            _secs(w.warmup_seconds),
        )
        spawn_seconds = w.hello_at - w.started_at if w.hello_at else None
        result = sw.result(w.pid, w.load_seconds, w.warmup_seconds, spawn_seconds, now)
        self.tell_switch(sw, "ready", **result)
        self.parts.metrics.switched(sw.mode, result)
        self.parts.outcomes.add(sw.request.future, result=result)
        if self.standby_wanted() and not self.parts.stopping:
            self.standby.prepare()

    def load_failed(self, error: ModeLoadError) -> None:
        """The loader raised. The switch fails once the worker is reaped (it
        exits 3 by itself; its own word goes in the log), so that a caller
        who sees the failure sees no worker in the status either."""
        self._switch_in_progress().failure = error
        self.stop("its mode failed to load", grace=1.0)

    def switch_failed(self, error: GpuvisorError, *, forget: bool = False) -> None:
        """The switch did not produce a READY worker. Its request fails, and
        so does every queued job before the next barrier that would run in
        that mode (it names the mode, or names none): a deterministic load
        failure is paid once per burst, not once per job. The mode stays in
        force (unless ``forget``: it no longer exists), so a later job that
        names no mode tries it again; every failed load counts against the
        mode's breaker, so retrying a broken mode ends with the mode broken
        (its jobs failing at once), never in a loop."""
        sw, self.switch = self._switch_in_progress(), None
        if sw.mode != self.mode:
            self.mode_served = False
        self.mode = None if forget else sw.mode
        self.mode_error = f"switch to {sw.mode!r} failed: {error.message}"
        log.error("mode %r failed to load: %s", sw.mode, error.message)
        self.tell_switch(sw, "failed", error=error.message)
        self.parts.metrics.switch_failed(sw.mode)
        self.parts.outcomes.add(sw.request.future, error=error)
        if placement.held_elsewhere(self.parts.devices, self, sw.mode):
            # Another device holds the mode: its jobs go there; this device
            # does not keep it, nor tries it again at once.
            self.mode = None
            self.refused[sw.mode] = self.clock() + self.config.restart_window
        else:
            self._fail_queued(sw.mode, error, unnamed_too=True)
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
        why = "restart" if request.restart else "switch" if request.future is not None else "jobs"
        self.parts.followers.tell(
            "switch",
            phase="failed",
            device=self.name,
            mode=mode,
            previous=self.mode,
            why=why,
            elapsed=0.0,
            error=error.message,
        )
        self.parts.metrics.switch_failed(mode)
        self.parts.outcomes.add(request.future, error=error)
        self._fail_queued(mode, error, unnamed_too=False)
        self.count_death(mode, f"it cannot be loaded: {error.message}")

    def _fail_queued(self, mode: str, error: GpuvisorError, *, unnamed_too: bool) -> None:
        """The queued jobs before the next barrier that would run in ``mode``
        fail with ``error`` (``unnamed_too``: those that name no mode, too,
        and they carry its details)."""
        details = error.details if unnamed_too else {}

        def error_for(job: QueuedJob) -> ModeLoadError | None:
            runs_in = (job.mode or mode) if unnamed_too else job.mode
            if runs_in != mode:
                return None
            return ModeLoadError(f"job {job.id} needs mode {mode!r}, which failed to load: {error.message}", **details)

        self.parts.outcomes.extend(self.parts.queue.fail_before_barrier(error_for))

    def count_death(self, mode: str, what: str) -> None:
        """A death (or a failed load) against ``mode``'s breaker here; when
        it breaks, the queued jobs of ``mode`` that no other device may run
        fail at once. Other modes are not touched."""
        if self.breakers.of(mode).count(what):
            config, devices = self.config, self.parts.devices
            self.parts.outcomes.extend(
                self.parts.queue.fail_before_barrier(
                    lambda job: (
                        self.broken_error(mode)
                        if job.mode == mode and not placement.can_serve(config, devices, mode)
                        else None
                    )
                )
            )
