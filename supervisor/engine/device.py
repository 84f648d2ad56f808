"""One device's life, the object the loop asks: its jobs (handed over,
answered, cancelled, given up, recycled), its deadlines, drain, and the one
place its worker's end is handled (``conclude``). Its state and switch are
the layers below (``device_state``, ``device_switch``).
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future
from typing import Any

from protocol import GpuvisorError, JobTimeout, ModeLoadError, WorkerCrashed, encode
from protocol.messages import Cancel, Drain, encode_batch
from supervisor.engine.commands import QueuedJob
from supervisor.engine.deadlines import Deadline
from supervisor.engine.device_state import Recycle
from supervisor.engine.device_switch import DeviceSwitching
from supervisor.engine.outcomes import worker_gone
from supervisor.engine.process import describe_exit
from supervisor.engine.switching import Gone, SwitchPhase
from supervisor.engine.worker_handle import HEARTBEATING, STARTING, Ending, WorkerHandle, WorkerState

log = logging.getLogger("gpuvisor")


class Device(DeviceSwitching):
    def dispatch(self, jobs: list[QueuedJob], w: WorkerHandle) -> bool:
        """Send ``jobs`` to ``w``: one job, or a batch for a handler that takes
        one (one BATCH message, started at once, each job timed from now).
        False if ``w`` turned out to be lost (the jobs then go back to the
        queue when its end is handled)."""
        # RUNNING from here on, so cancel() says False for a job that may run.
        jobs = [j for j in jobs if j.future.running() or j.future.set_running_or_notify_cancel()]
        if not jobs:
            return True
        frames = jobs[0].frames if len(jobs) == 1 else encode_batch(jobs[0].task, [j.frames for j in jobs])
        if not self.parts.link.send(w.identity, frames):
            w.unsent.extend(jobs)
            self.kill("stopped taking messages")
            return False
        if w.state is WorkerState.READY:
            w.transition(WorkerState.BUSY)
        now, metrics = self.clock(), self.parts.metrics
        if self.turn_since == float("inf"):
            self.turn_since = now  # the loaded mode's turn runs from its first job
        if len(jobs) > 1:
            self.batches["count"] += 1
            self.batches["jobs"] += len(jobs)
            self.batches["largest"] = max(self.batches["largest"], len(jobs))
            self.batches["last"] = len(jobs)
        for job in jobs:
            job.ran_in = w.mode
            metrics.job_started(w.mode, now - job.queued_at)
        if self.batch_limits(w, jobs[0]) is not None:
            metrics.batch(w.mode, jobs[0].task, len(jobs))
            self.last_batch[(w.mode, jobs[0].task)] = len(jobs)
        w.in_flight.extend(jobs)
        if len(jobs) > 1 or len(w.in_flight) == 1:
            for job in jobs:
                self.start_clock(job)
        return True

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

    def ran_out_of_memory(self, outcome: tuple) -> None:
        """A job's OOM: the allocator keeps its fragments, so the next job
        would likely fail too. The worker is stopped once the jobs already
        handed to it are done; the next job that needs the mode starts a
        fresh one. Not a death: the restart budget is untouched. If it stops
        now, the OOM is handed out once it is gone."""
        self.oom_recycles += 1
        self.recycle = self.recycle or Recycle("recycling after out of memory")
        self.recycle_if_due(outcome)

    def unload(self, future: Any) -> None:
        """An operator frees the device (``Supervisor.unload``): its worker
        goes once the jobs handed to it are done; queued jobs stay queued,
        and the next that needs the mode loads it again. A device that holds
        nothing, or is switching, is left as it is (the answer is None)."""
        w = self.worker
        if w is None or self.switch is not None or w.state in (WorkerState.STOPPING, WorkerState.EXITED):
            self.parts.outcomes.add(future, result=None)
            return
        log.info(
            "unloading mode %r on %s (worker pid %d)%s",
            w.mode,
            self.name,
            w.pid,
            f" once its {len(w.in_flight)} job(s) in flight are done" if w.in_flight else "",
        )
        self.recycle = self.recycle or Recycle("unloaded by an operator")
        self.recycle.unload = True
        self.parts.outcomes.hold(worker_gone(w.gen), future, result={"device": self.name, "mode": w.mode, "pid": w.pid})
        self.recycle_if_due()

    def recycle_if_due(self, outcome: tuple | None = None) -> None:
        """After an OOM or an operator's unload: stop the worker once the jobs
        handed to it are done (``outcome``: handed out once it is gone)."""
        recycle, w, outcomes = self.recycle, self.worker, self.parts.outcomes
        if recycle is not None and w is not None and not w.in_flight:
            self.recycle = None
            if recycle.unload:
                self.idle_unloaded = w.mode
            if outcome is not None:
                outcomes.hold(worker_gone(w.gen), outcome[0], result=outcome[1], error=outcome[2])
            self.stop(recycle.why)  # the mode stays in force
        elif outcome is not None:
            outcomes.add(outcome[0], result=outcome[1], error=outcome[2])

    def drain(self) -> None:
        """Shutdown: nothing is queued or in flight; DRAIN tells the worker to
        finish and exit 0."""
        w = self.worker
        if w is not None and w.state is WorkerState.READY:
            if not self.parts.link.send(w.identity, encode(Drain())):
                self.kill("stopped taking messages")
                return
            w.transition(WorkerState.DRAINING)
            self.parts.deadlines.after(self.key(Deadline.EXIT), self.config.stop_timeout)

    def begin_shutdown(self) -> None:
        self.standby.stop()

    def cancel(self, target: Any) -> bool:
        """A caller gave up on a job; True if it is stopped. One still queued
        is cancelled, as by ``Future.cancel()``. A stream the worker runs (or
        holds in its window) is stopped: its Future is cancelled now, its
        chunks from here on are dropped, and the worker is told to stop it at
        its next chunk (at once, or when it starts, for one still waiting in
        the window); its own answer is dropped when it comes, and until then
        it counts as running, under its timeout. Any other running job cannot
        be stopped."""
        w = self.worker
        job = next((j for j in w.in_flight if j.future is target), None) if w is not None else None
        if job is None:
            return Future.cancel(target)  # queued: it never runs; running or done: False
        if job.stopped:
            return True
        if job.on_chunk is None or job.stream_broken:
            return False  # not a stream, or one that already ended with its error
        job.stopped, job.on_chunk = True, None
        self.parts.outcomes.add(target, error=CancelledError())  # handed out before the caller's answer
        if job.started:
            self.send_cancel(job)
        return True

    def send_cancel(self, job: QueuedJob) -> None:
        """Tell the worker to stop ``job``, a stream it runs, at its next chunk."""
        w = self._live_worker()
        if job.cancel_sent or w.state is not WorkerState.BUSY:
            return  # told already, or ending anyway
        job.cancel_sent = True
        log.info(
            "job %d (%r): its caller cancelled the stream; telling worker gen %d to stop it", job.id, job.task, w.gen
        )
        if not self.parts.link.send(w.identity, encode(Cancel(job.id))):
            self.kill("stopped taking messages")

    def give_up(self, job: QueuedJob) -> None:
        """A client's own timeout passed while its job runs: the client gets
        ``JobTimeout`` now, and the worker is left to finish (its answer is
        dropped), so a client's short timeout never costs the others a worker
        and a reload, nor the mode its budget. Only the operator's limit
        (``job_timeout``, an HTTP model's ``timeout``) kills. A stream is told
        to stop at its next chunk, as when its caller cancels it."""
        job.given_up = True
        log.info(
            "job %d (%r) ran past its caller's %gs timeout: given up; the worker finishes it",
            job.id,
            job.task,
            job.give_up or 0.0,
        )
        self.parts.outcomes.add(
            job.future,
            error=JobTimeout(
                f"job {job.id} ran past its {job.give_up:g}s timeout; it was given up (its worker finishes it and its "
                "answer is dropped: only the operator's job_timeout stops a worker)"
            ),
        )
        if job.on_chunk is not None:
            job.stopped, job.on_chunk = True, None
            self.send_cancel(job)

    # ------------------------------------------------------------ deadlines

    def refresh_deadlines(self) -> None:
        """The deadlines that follow from the state as it is now, set anew
        each turn: heartbeat, load, the running job, respawn, idle unload."""
        d, w, now, config, key = self.parts.deadlines, self.worker, self.clock(), self.config, self._keys
        heartbeat = load = job = None
        if w is not None and w.state not in (WorkerState.STOPPING, WorkerState.EXITED):
            heartbeat = w.last_seen + config.heartbeat_timeout if w.state in HEARTBEATING else None
            load = w.started_at + config.load_timeout if w.state in STARTING else None
            job = min((t for j in w.running() for t in j.deadlines()), default=None)
        d.set(key[Deadline.HEARTBEAT], heartbeat)
        d.set(key[Deadline.LOAD], load)
        d.set(key[Deadline.JOB], job)
        respawn_at = self.breakers.of(self.mode).respawn_at if self.mode is not None else 0.0
        backing_off = self.worker is None and self.parts.queue and respawn_at > now
        d.set(key[Deadline.RESPAWN], respawn_at if backing_off else None)
        d.set(key[Deadline.IDLE_UNLOAD], self._idle_unload_at())
        busy = w is not None and w.state in (WorkerState.SPAWNED, WorkerState.LOADING, WorkerState.BUSY)
        heavy_busy = busy and w is not None and self.standby.heavy(w.spec.name)  # beside a light one, spares import
        here = self.mode_ahead  # a switch that takes the spare is coming: jobs wait for such a mode
        coming = any(mode != here and self.standby.heavy(mode) for mode in self.parts.queue.modes_ahead())
        d.set(key[Deadline.STANDBY_PACE], self.standby.pace(heavy_busy=heavy_busy, now=now, coming=coming))
        if self.standby.stopping and key[Deadline.STANDBY_REAP] not in d:
            d.after(key[Deadline.STANDBY_REAP], 0.05)  # stopped spares are reaped without waiting on them

    def _idle_unload_at(self) -> float | None:
        """When the idle worker is due to be stopped: only an idle worker with
        nothing queued, never while a job runs or waits."""
        w, queue = self.worker, self.parts.queue
        if w is None or w.state is not WorkerState.READY or self.switch or self.parts.stopping:
            return None
        if queue and (queue.barrier_queued() or any(self.may_run(m) for m in queue.modes_ahead())):
            return None  # something queued this device may run next, or a switch waits
        idle = self.config.idle_unload_for(w.spec)
        return w.idle_since + idle if idle > 0 else None

    def on_deadline(self, name: Deadline) -> None:
        """A deadline of this device fired (the loop's deadline phase)."""
        d, w, now, config = self.parts.deadlines, self.worker, self.clock(), self.config
        if name is Deadline.RECLAIM:
            self.poll_reclaim()
        elif name is Deadline.STOP:
            d.clear(self.key(name))
            self.escalate()
        elif name is Deadline.LAST_WORDS:
            d.clear(self.key(name))
        elif name in (Deadline.RESPAWN, Deadline.STANDBY_PACE, Deadline.BATCH):
            d.clear(self.key(name))  # the pump sees the backoff is over; refresh_deadlines asks the spare again
        elif name is Deadline.STANDBY_REAP:
            d.clear(self.key(name))
            self.standby.reap()
        elif w is None or w.state in (WorkerState.STOPPING, WorkerState.EXITED):
            d.clear(self.key(name))
        elif name is Deadline.JOB:
            self._job_deadline(w, now)
        elif name is Deadline.LOAD:
            self.kill(f"did not say READY within load_timeout={config.load_timeout:g}s")
        elif name is Deadline.HEARTBEAT:
            self.kill(
                f"hung: no message for {now - w.last_seen:.1f}s (heartbeat_timeout={config.heartbeat_timeout:g}s)"
            )
        elif name is Deadline.EXIT:
            d.clear(self.key(name))
            log.warning("worker pid %d did not exit within %gs of DRAIN", w.pid, config.stop_timeout)
            self.stop("drain took too long")
        elif name is Deadline.IDLE_UNLOAD:
            mode = w.mode
            self.stop(f"idle for {config.idle_unload_for(w.spec):g}s (idle_unload_s)")
            self.idle_unloaded = mode  # the mode stays in force: the next job loads it again

    def _job_deadline(self, w: WorkerHandle, now: float) -> None:
        """A running job's caller gives up, or its timeout kills the worker."""
        for running in w.running():
            if not running.given_up and running.give_up_at is not None and running.give_up_at <= now:
                self.give_up(running)
        # Its answer may have come in this very turn (a long turn: a large
        # result to decode): then nothing runs past a deadline any more.
        timed = [j for j in w.running() if j.deadline is not None]
        job = min(timed, key=lambda j: j.deadline or 0.0) if timed else None
        if job is None or job.deadline is None or job.deadline > now:
            self.parts.deadlines.set(
                self.key(Deadline.JOB), min((t for j in w.running() for t in j.deadlines()), default=None)
            )
            return
        limit = job.timeout or self.config.job_timeout
        self.kill(f"was killed: job {job.id} ran past its {limit:g}s timeout", JobTimeout, job.id)

    # ------------------------------------------------------------ the end of a worker

    def conclude(self) -> None:
        """The one place a worker's end is handled; a no-op until it is
        reaped and its last words are in. The job it was running gets its
        outcome (or runs again, if it may), the jobs it had not started go
        back to the queue in order, and the mode's breaker counts the death."""
        w, parts = self.worker, self.parts
        if w is None or w.state is not WorkerState.EXITED or self.key(Deadline.LAST_WORDS) in parts.deadlines:
            return
        for name in (Deadline.HEARTBEAT, Deadline.LOAD, Deadline.JOB, Deadline.EXIT):
            parts.deadlines.clear(self.key(name))
        self.worker = None
        self.recycle = None  # whatever ended it, the next worker is fresh
        parts.outcomes.release(worker_gone(w.gen))  # what waited for its end is due
        self.gone = Gone(w.pid, w.baseline_used, w.used_before, self.memory.get("worker_rss_bytes"), w.stopping_since)
        self.memory = {}
        w.close_fds()  # reads the last of its stderr
        code, ending, ended_in = w.returncode, w.ending, w.ended_in or w.state
        tail = w.stderr.tail()
        said = ("; its last stderr lines:\n    " + "\n    ".join(tail)) if tail else ""
        if parts.followers:
            on_purpose = ended_in is WorkerState.DRAINING or (ending is not None and ending.job_error is None)
            why = "drained" if ended_in is WorkerState.DRAINING else ending.why if ending is not None else None
            parts.followers.tell(
                "worker_ended",
                pid=w.pid,
                gen=w.gen,
                mode=w.mode,
                device=self.name,
                code=code,
                exit=describe_exit(code),
                why=why or describe_exit(code, loading=ended_in in STARTING),
                expected=on_purpose,
            )
        if ended_in is WorkerState.DRAINING:
            log.info("worker gen %d pid %d drained and %s", w.gen, w.pid, describe_exit(code))
            return
        if ending is not None and ending.job_error is None:  # we stopped it, idle, on purpose
            log.info("worker gen %d pid %d stopped (%s): %s", w.gen, w.pid, ending.why, describe_exit(code))
            parts.queue.put_back(w.unsent)
            if self.switch is not None and self.switch.failure is not None:
                self.switch_failed(self.switch.failure)
            elif self.switch is not None and self.switch.phase is SwitchPhase.STOPPING:
                self.after_stop(stopped_here=True)
            return
        how = ending.why if ending is not None else describe_exit(code, loading=ended_in in STARTING)
        log.error("worker gen %d pid %d %s (state %s)", w.gen, w.pid, how, ended_in.value)
        if ended_in in STARTING:
            self._died_loading(w, f"worker pid {w.pid} {how} while loading mode {w.mode!r}", said, tail)
            return
        self.restarts += 1
        running = w.running()  # the head, or the head's batch: started, so they get the error (or run again)
        parts.queue.put_back([*(j for j in w.in_flight if not j.started), *w.unsent])  # they keep their place
        self.count_death(w.mode, f"worker pid {w.pid} {how}")  # may break the mode here
        broken = self.breakers.of(w.mode).failed is not None
        for job in running:
            error = verdict(w, job, ending, how, said, tail, broken)
            if error is None:
                log.warning("job %d (%r) will run again (%d retries left)", job.id, job.task, job.retries)
                parts.queue.put_back([job])  # first in line, as it was
            elif not job.given_up:  # a job given up has its outcome already
                parts.outcomes.add(job.future, error=error)

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
            self.tell_switch(self.switch, "failed", error=what)
            self.switch = None
            self.restarts += 1
            self.count_death(w.mode, what)  # may break the mode, which fails them
            return
        self.switch_failed(ModeLoadError(f"{what}{said}", stderr_tail=tail))


def verdict(
    w: WorkerHandle, job: QueuedJob, ending: Ending | None, how: str, said: str, tail: list[str], broken: bool
) -> GpuvisorError | None:
    """What one job the dead worker was running gets: its error, or None to
    run again (a crash, with retries left, in a mode not broken; the retry
    is counted here)."""
    if job.given_up:
        return GpuvisorError("given up")  # its caller has its outcome already: nobody waits for another run
    job_error: type[GpuvisorError] = WorkerCrashed
    if ending is not None and ending.job_id == job.id:
        job_error = ending.job_error or WorkerCrashed
    elif ending is not None and ending.job_id is not None:
        # The cause was about another job: one that answered in its last
        # words (this one was merely running next), or one of its batch.
        how = f"was killed while running the next job ({ending.why})"
        if len(w.in_flight) > 1 and any(j.id == ending.job_id for j in w.in_flight):
            how = f"was killed while running a batch with job {ending.job_id} ({ending.why})"
    if job_error is WorkerCrashed and job.retries > 0 and not broken:
        job.retries -= 1
        job.started = False
        return None
    message = f"worker pid {w.pid} (mode {w.mode!r}) {how} while running job {job.id} ({job.task!r}){said}"
    if broken:
        message += f"; mode {w.mode!r} is broken now (its restart budget is spent), so it was not retried"
    return job_error(message, stderr_tail=tail)
