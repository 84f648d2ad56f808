"""What the loop asks of a slot that may end its worker: hand it a job,
stop a stream it runs, send it its mode, switch it, recycle it, drain it,
and act on its deadlines.
Each of these may find the worker gone or decide it must go; that is
recorded with ``ending.stop()`` or ``ending.kill()``, and the worker's end
is handled in the loop's own phase (``ending.conclude()``).
"""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError, Future

from protocol import Drain, JobTimeout, Load, ModeLoadError, encode, encode_batch
from protocol.messages import Cancel
from supervisor.engine import ending
from supervisor.engine.commands import CancelJob, QueuedJob, QueuedSwitch, Recycle, Unload
from supervisor.engine.deadlines import Deadline
from supervisor.engine.preflight import loader_problem
from supervisor.engine.slot import Slot
from supervisor.engine.switching import Switch
from supervisor.engine.worker_handle import WorkerHandle, WorkerState

log = logging.getLogger("gpuvisor")


def dispatch(slot: Slot, jobs: list[QueuedJob], w: WorkerHandle) -> bool:
    """Send ``jobs`` to ``w``: one job, or a batch for a handler that takes
    one (one BATCH message, started at once, each job timed from now).
    False if ``w`` turned out to be lost (the jobs then go back to the queue
    when its end is handled)."""
    # RUNNING from here on, so cancel() says False for a job that may run.
    jobs = [j for j in jobs if j.future.running() or j.future.set_running_or_notify_cancel()]
    if not jobs:
        return True
    frames = jobs[0].frames if len(jobs) == 1 else encode_batch(jobs[0].task, [j.frames for j in jobs])
    if not slot.engine.link.send(w.identity, frames):
        w.unsent.extend(jobs)
        ending.kill(slot, "stopped taking messages")
        return False
    if w.state is WorkerState.READY:
        w.transition(WorkerState.BUSY)
    if slot.turn_since == float("inf"):
        slot.turn_since = slot.clock()  # the loaded mode's turn runs from its first job
    if len(jobs) > 1:
        slot.batched(jobs)
    now, metrics = slot.clock(), slot.engine.metrics
    for job in jobs:
        job.ran_in = w.mode
        metrics.job_started(w.mode, now - job.queued_at)
    if slot.batch_limits(w, jobs[0]) is not None:
        metrics.batch(w.mode, jobs[0].task, len(jobs))
        slot.last_batch[(w.mode, jobs[0].task)] = len(jobs)
    w.in_flight.extend(jobs)
    if len(jobs) > 1 or len(w.in_flight) == 1:
        for job in jobs:
            slot.start_clock(job)
    return True


def cancel(slot: Slot, command: CancelJob) -> None:
    """A caller gave up on a job. One still queued is cancelled, as by
    ``Future.cancel()``. A stream the worker runs (or holds in its window)
    is stopped: its Future is cancelled now, its chunks from here on are
    dropped, and the worker is told to stop it at its next chunk (at once,
    or when it starts, for one still waiting in the window); its own answer
    is dropped when it comes, and until then it counts as running, under
    its timeout. Any other running job cannot be stopped."""
    target, w = command.target, slot.worker
    job = next((j for j in w.in_flight if j.future is target), None) if w is not None else None
    if job is None:
        stopped = Future.cancel(target)  # queued: it never runs; running or done: False
    elif job.stopped:
        stopped = True
    elif job.on_chunk is None or job.stream_broken:
        stopped = False  # not a stream, or one that already ended with its error
    else:
        job.stopped, job.on_chunk = True, None
        slot.engine.decide(target, error=CancelledError())  # handed out before the caller's answer
        if job.started:
            send_cancel(slot, job)
        stopped = True
    slot.engine.decide(command.future, result=stopped)


def send_cancel(slot: Slot, job: QueuedJob) -> None:
    """Tell the worker to stop ``job``, a stream it runs, at its next chunk."""
    w = slot.current()
    if job.cancel_sent or w.state is not WorkerState.BUSY:
        return  # told already, or ending anyway
    job.cancel_sent = True
    log.info("job %d (%r): its caller cancelled the stream; telling worker gen %d to stop it", job.id, job.task, w.gen)
    if not slot.engine.link.send(w.identity, encode(Cancel(job.id))):
        ending.kill(slot, "stopped taking messages")


def drain(slot: Slot) -> None:
    """Shutdown: nothing is queued or in flight; DRAIN tells the worker to
    finish and exit 0."""
    w = slot.worker
    if w is not None and w.state is WorkerState.READY:
        if not slot.engine.link.send(w.identity, encode(Drain())):
            ending.kill(slot, "stopped taking messages")
            return
        w.transition(WorkerState.DRAINING)
        slot.engine.deadlines.after(slot.at(Deadline.EXIT), slot.config.stop_timeout)


def unload(slot: Slot, command: Unload) -> None:
    """An operator frees the device (``Supervisor.unload``): its worker
    goes once the jobs handed to it are done; queued jobs stay queued, and
    the next that needs the mode loads it again. A device that holds
    nothing, or is switching, is left as it is (the answer is None)."""
    w = slot.worker
    if w is None or slot.switch is not None or w.state in (WorkerState.STOPPING, WorkerState.EXITED):
        slot.engine.decide(command.future, result=None)
        return
    log.info("unloading mode %r on %s (worker pid %d)%s", w.mode, slot.name, w.pid,
             f" once its {len(w.in_flight)} job(s) in flight are done" if w.in_flight else "")  # fmt: skip
    slot.recycle = slot.recycle or Recycle("unloaded by an operator")
    slot.recycle.unload = True
    slot.recycle.then.append((command.future, {"device": slot.name, "mode": w.mode, "pid": w.pid}, None))
    recycle_if_due(slot)


def recycle_if_due(slot: Slot, *then: tuple) -> None:
    """After an OOM or an operator's unload: stop the worker once the jobs
    handed to it are done (``then``: outcomes to hand out once it is gone)."""
    recycle, w = slot.recycle, slot.worker
    if recycle is not None and w is not None and not w.in_flight:
        slot.recycle = None
        if recycle.unload:
            slot.idle_unloaded = w.mode
        ending.stop(slot, recycle.why, then=[*recycle.then, *then])  # the mode stays in force
    else:
        for future, result, error in then:
            slot.engine.decide(future, result=result, error=error)


def begin_switch(slot: Slot, request: QueuedSwitch) -> None:
    """Stop the worker, wait (never blocking the loop) until it is reaped
    and its memory is back, then spawn the new one."""
    if request.future is not None and not request.future.set_running_or_notify_cancel():
        return  # cancelled while queued
    if request.mode is None:
        raise RuntimeError("a switch begins with its mode known (restart() of no mode is answered before)")
    w = slot.worker
    spec = slot.config.mode(request.mode)
    respawn = request.future is None and request.mode == slot.mode and slot.mode_served
    if spec is not None and not respawn and not slot.config.worker_command:
        problem = loader_problem(spec.loader, slot.config.loader_path)
        if problem is not None:  # the worker that serves is left as it is
            slot.refuse_switch(request, ModeLoadError(f"mode {request.mode!r}: {problem}"))
            return
    slot.switch = Switch(request.mode, request, w.mode if w is not None else None, slot.clock())
    if request.future is not None or request.mode != slot.mode:  # a respawn or a reload puts nothing new in force
        slot.mode_since = slot.clock()
    slot.idle_unloaded = None
    if w is None:
        slot.after_stop(stopped_here=False)
        return
    log.info("switching %s from mode %r to %r: stopping worker pid %d", slot.name, w.mode, request.mode, w.pid)
    slot.tell_switch(slot.switch, "stop", pid=w.pid)
    if w.state is not WorkerState.STOPPING:
        ending.stop(slot, f"switching to mode {request.mode!r}")


def load_failed(slot: Slot, error: ModeLoadError) -> None:
    """The loader raised. The switch fails once the worker is reaped (it
    exits 3 by itself; its own word goes in the log), so that a caller
    who sees the failure sees no worker in the status either."""
    slot.under_way().failure = error
    ending.stop(slot, "its mode failed to load", grace=1.0)


def on_deadline(slot: Slot, name: Deadline) -> None:
    """A deadline of this slot fired (the loop's deadline phase)."""
    d, w, now = slot.engine.deadlines, slot.worker, slot.clock()
    if name is Deadline.RECLAIM:
        slot.poll_reclaim()
    elif name is Deadline.STOP:
        d.clear(slot.at(name))
        ending.escalate(slot)
    elif name is Deadline.LAST_WORDS:
        d.clear(slot.at(name))
    elif name in (Deadline.RESPAWN, Deadline.STANDBY_PACE, Deadline.BATCH):
        d.clear(slot.at(name))  # the pump sees the backoff is over; refresh_deadlines asks the spare again
    elif name is Deadline.STANDBY_REAP:
        d.clear(slot.at(name))
        slot.standby.reap()
    elif w is None or w.state in (WorkerState.STOPPING, WorkerState.EXITED):
        d.clear(slot.at(name))
    elif name is Deadline.JOB:
        for running in slot.running(w):
            if not running.given_up and running.give_up_at is not None and running.give_up_at <= now:
                give_up(slot, running)
        # Its answer may have come in this very turn (a long turn: a large
        # result to decode): then nothing runs past a deadline any more.
        timed = [j for j in slot.running(w) if j.deadline is not None]
        job = min(timed, key=lambda j: j.deadline or 0.0) if timed else None
        if job is None or job.deadline is None or job.deadline > now:
            d.set(slot.at(name), min((t for j in slot.running(w) for t in j.deadlines()), default=None))
            return
        limit = job.timeout or slot.config.job_timeout
        ending.kill(slot, f"was killed: job {job.id} ran past its {limit:g}s timeout", JobTimeout, job.id)
    elif name is Deadline.LOAD:
        ending.kill(slot, f"did not say READY within load_timeout={slot.config.load_timeout:g}s")
    elif name is Deadline.HEARTBEAT:
        ending.kill(slot, f"hung: no message for {now - w.last_seen:.1f}s "
                  f"(heartbeat_timeout={slot.config.heartbeat_timeout:g}s)")  # fmt: skip
    elif name is Deadline.EXIT:
        d.clear(slot.at(name))
        log.warning("worker pid %d did not exit within %gs of DRAIN", w.pid, slot.config.stop_timeout)
        ending.stop(slot, "drain took too long")
    elif name is Deadline.IDLE_UNLOAD:
        mode = w.mode
        ending.stop(slot, f"idle for {slot.config.idle_unload_for(w.spec):g}s (idle_unload_s)")
        slot.idle_unloaded = mode  # the mode stays in force: the next job loads it again


def give_up(slot: Slot, job: QueuedJob) -> None:
    """A client's own timeout passed while its job runs: the client gets
    ``JobTimeout`` now, and the worker is left to finish (its answer is
    dropped), so a client's short timeout never costs the others a worker
    and a reload, nor the mode its budget. Only the operator's limit
    (``job_timeout``, an HTTP model's ``timeout``) kills. A stream is told
    to stop at its next chunk, as when its caller cancels it."""
    job.given_up = True
    log.info("job %d (%r) ran past its caller's %gs timeout: given up; the worker finishes it", job.id, job.task,
             job.give_up or 0.0)  # fmt: skip
    slot.engine.decide(job.future, error=JobTimeout(
        f"job {job.id} ran past its {job.give_up:g}s timeout; it was given up (its worker finishes it and its answer "
        "is dropped: only the operator's job_timeout stops a worker)"))  # fmt: skip
    if job.on_chunk is not None:
        job.stopped, job.on_chunk = True, None
        send_cancel(slot, job)


def send_load(slot: Slot, w: WorkerHandle) -> None:
    spec = w.spec
    load = Load(spec.name, spec.loader, spec.args, spec.warmup, list(slot.config.loader_path) or None)
    if slot.engine.link.send(w.identity, encode(load)):
        w.transition(WorkerState.LOADING)
        spawn_seconds = w.hello_at - w.started_at if w.hello_at else None
        log.info("worker pid %d up in %.2fs; loading mode %r", w.pid, spawn_seconds or 0.0, spec.name)
        if slot.switch is not None:
            slot.tell_switch(slot.switch, "load", pid=w.pid, spawn_seconds=spawn_seconds)
    else:
        ending.kill(slot, "stopped taking messages")
