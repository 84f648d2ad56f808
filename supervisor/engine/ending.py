"""How a worker ends, and what its end means: the one place it is handled.

Nothing that decides a worker must go waits for it. ``stop()`` asks it to
end (SIGTERM, then SIGKILL at a deadline); ``kill()`` ends it now
(SIGKILL). Either records why, as an ``Ending``. Its pidfd fires when it is
gone: ``notice_exit()`` reaps it, and with jobs in flight its socket is
read a moment longer for its last words. Then ``conclude()``, called in the
loop's own phase, settles what it held: the job it was running gets its
outcome (or runs again, if it may), the jobs it had not started go back to
the queue in order, and the mode's breaker counts the death.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING

from protocol import GpuvisorError, ModeLoadError, WorkerCrashed
from supervisor.engine.commands import QueuedJob
from supervisor.engine.deadlines import Deadline
from supervisor.engine.process import describe_exit
from supervisor.engine.switching import Gone, SwitchPhase
from supervisor.engine.worker_handle import STARTING, Ending, WorkerHandle, WorkerState

if TYPE_CHECKING:
    from supervisor.engine.slot import Slot

log = logging.getLogger("gpuvisor")

LAST_WORDS_QUIET_S = 0.02  # after a death: the worker's socket quiet this long means all it sent is in
LAST_WORDS_MAX_S = 0.5


def stop(slot: Slot, why: str, *, grace: float = 0.0, then: list | None = None) -> None:
    """Ask the worker to end, on purpose, with nothing running: SIGTERM
    (after ``grace`` seconds if it may still exit by itself), then SIGKILL
    ``stop_timeout`` later. ``then``: outcomes that wait until it is gone."""
    _end(slot, Ending(why, then=then or []), signal.SIGTERM if not grace else None)
    slot.engine.deadlines.after(slot.at(Deadline.STOP), grace or slot.config.stop_timeout)


def kill(slot: Slot, why: str, job_error: type[GpuvisorError] = WorkerCrashed, job_id: int | None = None) -> None:
    """End the worker now (SIGKILL): it hangs, ran past a timeout or broke
    the protocol. The job it runs (``job_id``, by default the head) gets
    ``job_error``, saying ``why``; others running with it, ``WorkerCrashed``."""
    w = slot.current()
    if job_id is None and w.in_flight:
        job_id = w.in_flight[0].id
    _end(slot, Ending(why, job_error, job_id), signal.SIGKILL)


def _end(slot: Slot, ending: Ending, sig: signal.Signals | None) -> None:
    w = slot.current()
    if w.state is WorkerState.EXITED:
        return
    if w.state is not WorkerState.STOPPING:
        w.ending, w.used_before, w.stopping_since = ending, slot.device_used(), slot.clock()
        w.transition(WorkerState.STOPPING)
    elif sig is signal.SIGKILL and w.ending is not None and w.ending.job_error is None:
        w.ending = ending  # a stop turned into a kill: the new reason is the one that matters
    if sig is not None:
        w.signalled = sig
        slot.processes.signal(w.proc, sig)


def escalate(slot: Slot) -> None:
    """The STOP deadline: a worker given its grace gets SIGTERM; one still
    there after SIGTERM gets SIGKILL."""
    w = slot.worker
    if w is None or w.state is not WorkerState.STOPPING or w.reap():
        return
    if w.signalled is None:
        w.signalled = signal.SIGTERM
        slot.processes.signal(w.proc, signal.SIGTERM)
        slot.engine.deadlines.after(slot.at(Deadline.STOP), slot.config.stop_timeout)
        return
    log.warning("worker pid %d ignored SIGTERM for %.1fs; sending SIGKILL", w.pid, slot.config.stop_timeout)
    w.signalled = signal.SIGKILL
    slot.processes.signal(w.proc, signal.SIGKILL)


def notice_exit(slot: Slot) -> None:
    """The worker's pidfd fired (or, without one, a turn passed): reap it.
    With jobs in flight, its last messages may still be on their way:
    they are read until its socket has been quiet a moment."""
    w = slot.worker
    if w is None or w.state is WorkerState.EXITED or not w.reap():
        return
    if w.state is not WorkerState.STOPPING and w.ending is None:
        w.used_before, w.stopping_since = slot.device_used(), slot.clock()
    w.transition(WorkerState.EXITED)
    slot.engine.deadlines.clear(slot.at(Deadline.STOP))
    if w.in_flight:
        w.last_words_until = slot.clock() + LAST_WORDS_MAX_S
        slot.engine.deadlines.after(slot.at(Deadline.LAST_WORDS), LAST_WORDS_QUIET_S)


def heard_last_words(slot: Slot) -> None:
    """A message from the dead worker: wait a little longer for the rest."""
    w = slot.current()
    quiet = min(slot.clock() + LAST_WORDS_QUIET_S, w.last_words_until)
    slot.engine.deadlines.set(slot.at(Deadline.LAST_WORDS), quiet)


def conclude(slot: Slot) -> None:
    """The one place a worker's end is handled; a no-op until it is
    reaped and its last words are in."""
    w = slot.worker
    if w is None or w.state is not WorkerState.EXITED or slot.at(Deadline.LAST_WORDS) in slot.engine.deadlines:
        return
    for name in (Deadline.HEARTBEAT, Deadline.LOAD, Deadline.JOB, Deadline.EXIT):
        slot.engine.deadlines.clear(slot.at(name))
    slot.worker = None
    if slot.recycle is not None:  # whatever ended it, the next worker is fresh: what waited for its end is due
        for future, result, error in slot.recycle.then:
            slot.engine.decide(future, result=result, error=error)
        slot.recycle = None
    slot.gone = Gone(w.pid, w.baseline_used, w.used_before, slot.memory.get("worker_rss_bytes"), w.stopping_since)
    slot.memory = {}
    w.close_fds()  # reads the last of its stderr
    code, ending, ended_in = w.returncode, w.ending, w.ended_in or w.state
    for future, result, error in ending.then if ending is not None else ():
        slot.engine.decide(future, result=result, error=error)
    tail = w.stderr_tail()
    said = ("; its last stderr lines:\n    " + "\n    ".join(tail)) if tail else ""
    if slot.engine.followers:
        on_purpose = ended_in is WorkerState.DRAINING or (ending is not None and ending.job_error is None)
        why = "drained" if ended_in is WorkerState.DRAINING else ending.why if ending is not None else None
        slot.engine.tell("worker_ended", pid=w.pid, gen=w.gen, mode=w.mode, device=slot.name, code=code,
                         exit=describe_exit(code), why=why or describe_exit(code, loading=ended_in in STARTING),
                         expected=on_purpose)  # fmt: skip
    if ended_in is WorkerState.DRAINING:
        log.info("worker gen %d pid %d drained and %s", w.gen, w.pid, describe_exit(code))
        return
    if ending is not None and ending.job_error is None:  # we stopped it, idle, on purpose
        log.info("worker gen %d pid %d stopped (%s): %s", w.gen, w.pid, ending.why, describe_exit(code))
        slot.engine.queue.put_back(w.unsent)
        if slot.switch is not None and slot.switch.failure is not None:
            slot.switch_failed(slot.switch.failure)
        elif slot.switch is not None and slot.switch.phase is SwitchPhase.STOPPING:
            slot.after_stop(stopped_here=True)
        return
    how = ending.why if ending is not None else describe_exit(code, loading=ended_in in STARTING)
    log.error("worker gen %d pid %d %s (state %s)", w.gen, w.pid, how, ended_in.value)
    if ended_in in STARTING:
        _died_loading(slot, w, f"worker pid {w.pid} {how} while loading mode {w.mode!r}", said, tail)
        return
    slot.restarts += 1
    running = slot.running(w)  # the head, or the head's batch: started, so they get the error (or run again)
    slot.engine.queue.put_back([*(j for j in w.in_flight if not j.started), *w.unsent])  # they keep their place
    slot.count_death(w.mode, f"worker pid {w.pid} {how}")  # may break the mode here
    for job in running:
        _judge(slot, w, job, ending, how, said, tail)


def _judge(slot: Slot, w: WorkerHandle, job: QueuedJob, ending: Ending | None, how: str, said: str,
           tail: list[str]) -> None:  # fmt: skip
    """One job the dead worker was running: its error, or another run."""
    if job.given_up:
        return  # its caller has its outcome already: nobody waits for another run
    job_error: type[GpuvisorError] = WorkerCrashed
    if ending is not None and ending.job_id == job.id:
        job_error = ending.job_error or WorkerCrashed
    elif ending is not None and ending.job_id is not None:
        # The cause was about another job: one that answered in its last
        # words (this one was merely running next), or one of its batch.
        how = f"was killed while running the next job ({ending.why})"
        if len(w.in_flight) > 1 and any(j.id == ending.job_id for j in w.in_flight):
            how = f"was killed while running a batch with job {ending.job_id} ({ending.why})"
    broken = slot.breakers.of(w.mode).failed is not None
    if job_error is WorkerCrashed and job.retries > 0 and not broken:
        job.retries -= 1
        job.started = False
        log.warning("job %d (%r) will run again (%d retries left)", job.id, job.task, job.retries)
        slot.engine.queue.put_back([job])  # first in line, as it was
        return
    message = f"worker pid {w.pid} (mode {w.mode!r}) {how} while running job {job.id} ({job.task!r}){said}"
    if broken:
        message += f"; mode {w.mode!r} is broken now (its restart budget is spent), so it was not retried"
    slot.engine.decide(job.future, error=job_error(message, stderr_tail=tail))


def _died_loading(slot: Slot, w: WorkerHandle, what: str, said: str, tail: list[str]) -> None:
    if slot.switch is None:  # its LOAD_FAILED already failed the switch
        return
    if slot.switch.standby and w.ended_in is WorkerState.SPAWNED and w.ending is None:
        # A spare that died before it said HELLO (killed while idle, just
        # as it was taken): not the mode's fault. A fresh process instead.
        log.warning("the warm standby taken as worker gen %d was already dead; starting a fresh worker", w.gen)
        slot.spawn(standby=False)
        return
    if slot.is_respawn():
        # The mode was serving and is still wanted: an OOM kill or an
        # operator's kill during a reload is a death like any other. The
        # jobs wait for the next respawn, after the backoff.
        slot.tell_switch(slot.switch, "failed", error=what)
        slot.switch = None
        slot.restarts += 1
        slot.count_death(w.mode, what)  # may break the mode, which fails them
        return
    slot.switch_failed(ModeLoadError(f"{what}{said}", stderr_tail=tail))
