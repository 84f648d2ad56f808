"""The engine: one thread owns the worker socket, the queue and the workers.

::

      API threads (Supervisor, AsyncSupervisor, the daemon)
        | post(command) -> Mailbox + one byte on its wake-up pipe
        v
    +------------------------------ loop thread ------------------------------+
    |  poll([mailbox, worker socket, worker pidfd + stderr], next deadline)   |
    |   1. news    worker stderr; messages (inbox): HELLO READY RESULT ...    |
    |   2. exits   a pidfd fired: reap the worker (its last words may follow) |
    |   3. commands  submit, switch, restart, reload, cancel, shutdown        |
    |   4. deadlines heartbeat, load, job, stop, drain, reclaim ... (one table)|
    |   5. ends    a reaped worker whose last words are in: its end, once     |
    |   6. pump    hand queued work to the worker, or begin a switch          |
    |   7. publish a fresh status snapshot, then hand the outcomes out        |
    +-------------------------------------------------------------------------+

Nothing here is touched by another thread: API threads only post commands
and read the published snapshot, so there are no locks around state. No
phase waits: stopping a worker is a state with a deadline, and its pidfd
says when to reap it. A worker's end is handled in phase 5 alone, so no
handler ever re-enters another. Workers are spawned from this thread on
purpose: PR_SET_PDEATHSIG fires when the thread that forked the child ends,
and this thread lives as long as the supervisor does.

Outcomes decided during a turn are handed out after the turn's snapshot is
published: when a caller sees its Future done, ``status()`` already tells
the same story.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from types import MappingProxyType
from typing import Any

import zmq

from protocol import GpuvisorError, JobCancelled, NoModeLoaded, ShuttingDown
from protocol.messages import MAX_FRAMES
from supervisor.config import Config
from supervisor.engine import ending, inbox, work
from supervisor.engine.commands import CancelJob, Command, QueuedJob, QueuedSwitch, Reload, Shutdown
from supervisor.engine.deadlines import Deadline, Deadlines
from supervisor.engine.devices import choose_device
from supervisor.engine.link import WorkerLink
from supervisor.engine.process import stop_and_reap
from supervisor.engine.queue import JobQueue
from supervisor.engine.slot import Slot
from supervisor.engine.worker_handle import SERVING, WorkerHandle, WorkerState
from supervisor.futures import settle
from supervisor.mailbox import Mailbox
from supervisor.metrics import Metrics, outcome_of
from supervisor.status import Status, already_loaded, not_started

log = logging.getLogger("gpuvisor")

_IDLE_POLL_S = 1.0  # upper bound on a poll: the snapshot stays fresh for healthy() even with no events
_NO_PIDFD_POLL_S = 0.05  # how often to look for the worker's exit where pidfd_open is missing


class Engine:
    def __init__(self, config: Config):
        self.config = config
        self.owner_pid = os.getpid()
        self.mailbox: Mailbox[Command] = Mailbox()
        self._thread = threading.Thread(target=self._main, name="gpuvisor-loop", daemon=True)
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None
        self._status: MappingProxyType = MappingProxyType(not_started())
        self.published_at = 0.0
        # Counted on the loop thread (and by job Futures' callbacks wherever they
        # settle); read by any thread that scrapes.
        self.metrics = Metrics(lambda: self._status)
        # Everything below belongs to the loop thread.
        self.queue = JobQueue(max_wait=lambda mode: self.config.max_wait_for(mode))
        self.deadlines = Deadlines()
        # Made by the loop thread as it starts (_main), before any other use.
        self.link: WorkerLink
        self.slot: Slot
        self._generation = 0
        self.tasks: dict[
            str, list[str]
        ] = {}  # mode -> its tasks, as its worker said in READY (replaced, never mutated)
        self._shutdown: Shutdown | None = None
        self._shutdown_waiters: list[Future] = []
        # Every Future the loop has taken charge of, so that even a crash of the
        # loop itself gives each one an outcome. Weak: a settled Future the
        # caller dropped costs nothing.
        self._accepted: weakref.WeakSet[Future] = weakref.WeakSet()
        self._outcomes: list[tuple[Future, Any, BaseException | None]] = []
        self._after_standbys: list[tuple[Future, Any, BaseException | None]] = []  # until stopped spares are reaped

    # ------------------------------------------------ API-thread side (only these)

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"gpuvisor loop thread did not bind its socket within {timeout}s")
        if self._boot_error is not None:
            raise self._boot_error

    def post(self, command: Command) -> None:
        if os.getpid() != self.owner_pid:
            raise RuntimeError(
                "this Supervisor was created in another process (before a fork); "
                "its loop thread is not here. Create the Supervisor after forking."
            )
        if not self.mailbox.put(command):
            _refuse(command)

    @property
    def status(self) -> Status:
        return dict(self._status)  # type: ignore[return-value]

    def modes(self) -> dict[str, dict[str, Any]]:
        """Each configured mode: its loader, whether it is loaded now, and its
        tasks (None until a worker of that mode has said READY)."""
        config, loaded, tasks = self.config, self._status.get("mode"), dict(self.tasks)
        return {
            name: {"loader": spec.loader, "loaded": name == loaded, "tasks": tasks.get(name)}
            for name, spec in sorted(config.modes.items())
        }

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_loop_thread(self) -> bool:
        """Future callbacks run on the loop thread; waiting there would deadlock."""
        return threading.current_thread() is self._thread

    # ------------------------------------------------ what the parts call (loop thread)

    def decide(self, future: Future | None, *, result: Any = None, error: BaseException | None = None) -> None:
        """``future``'s outcome, handed out at the end of this turn."""
        if future is not None:
            self._outcomes.append((future, result, error))

    def fail_before_barrier(self, error_for: Callable[[QueuedJob], GpuvisorError | None]) -> None:
        self._outcomes.extend(self.queue.fail_before_barrier(error_for))

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    @property
    def shutting_down(self) -> bool:
        return self._shutdown is not None

    # ------------------------------------------------------------ the thread

    def _main(self) -> None:
        try:
            self.link = WorkerLink()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._boot_error = exc
            self._ready.set()
            return
        try:
            self.slot = Slot(self, choose_device(self.config.device))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._boot_error = exc
            self.link.close()
            self._ready.set()
            return
        self._publish()
        self._ready.set()
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 - logged here once; every Future gets the error
            log.exception("gpuvisor loop crashed; stopping the worker and failing all work")
            self._abort(GpuvisorError("the supervisor's loop crashed; see its log"))
        finally:
            self._end_standbys()
            self._publish(state="stopped")
            self._hand_out()
            self.link.close()
            for command in self.mailbox.close():
                _refuse(command)
            for waiter in self._shutdown_waiters:
                settle(waiter, result=None)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.mailbox.fd, zmq.POLLIN)
        poller.register(self.link.socket, zmq.POLLIN)
        watched: set[int] = set()
        slot = self.slot
        while not self._finished():
            w = slot.worker
            wanted = {fd for fd in (w.pidfd, w.stderr_fd) if fd is not None} if w is not None else set()
            for fd in watched - wanted:
                poller.unregister(fd)
            for fd in wanted - watched:
                poller.register(fd, zmq.POLLIN)
            watched = wanted
            longest = _NO_PIDFD_POLL_S if w is not None and w.pidfd is None else _IDLE_POLL_S
            events = dict(poller.poll(math.ceil(self.deadlines.wait(longest) * 1000)))
            # 1. news from the workers, before commands: a command must see the
            # worker as it is now (a switch to a mode whose worker just died is not a no-op).
            if w is not None and w.stderr_fd in events:
                w.pump_stderr()
            if self.link.socket in events:
                for got in self.link.receive():
                    inbox.handle(slot, got)
            # 2. exits. Without a pidfd, look every turn.
            if w is not None and (w.pidfd is None or w.pidfd in events):
                ending.notice_exit(slot)
            # 3. commands
            if self.mailbox.fd in events:
                self._take_commands()
            # 4. deadlines
            for name in self.deadlines.due():
                if isinstance(name, tuple):  # a slot's
                    work.on_deadline(slot, name[0])
                else:
                    self.deadlines.clear(name)
                    log.warning("shutdown drain ran out of time; cancelling what is left")
                    self._cancel_everything(JobCancelled("shutdown's drain timeout passed before this job ran"))
            # 5. a worker's end
            ending.conclude(slot)
            if self._after_standbys and not slot.standby.stopping:
                self._outcomes.extend(self._after_standbys)
                self._after_standbys.clear()
            # 6. the pump
            self._pump()
            slot.refresh_deadlines()
            # 7. publish, then hand out
            self._publish()
            self._hand_out()
        for fd in watched:
            poller.unregister(fd)

    def _finished(self) -> bool:
        """Shut down, and nothing is left: no worker alive, nothing queued."""
        slot = self.slot
        return self._shutdown is not None and slot.worker is None and slot.switch is None and not self.queue

    def _take_commands(self) -> None:
        commands = self.mailbox.take_all()
        for command in commands:
            if command.future is not None:
                self._accepted.add(command.future)
            if isinstance(command, QueuedJob):
                command.future.add_done_callback(functools.partial(self._job_ended, command, time.monotonic()))
        for command in commands:
            self._on_command(command)
        if len(self.queue) > self.config.max_queue:
            # Only cancelled jobs can push it past max_queue (their slots are
            # back); drop them now rather than when they reach the head.
            self.queue.drop_cancelled()

    def _job_ended(self, job: QueuedJob, since: float, future: Future) -> None:
        """Counted wherever the job's Future settles: on this thread, or on a
        caller's that cancelled it while queued."""
        self.metrics.job_ended(job.ran_in or job.mode, job.task, outcome_of(future), time.monotonic() - since)

    def _hand_out(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        for n, (future, result, error) in enumerate(outcomes):
            try:
                # The queue slot first: a caller woken by the result may submit
                # again at once, and must find its slot free.
                release = getattr(future, "release_slot", None)
                if release is not None:
                    release()
                settle(future, result=result, error=error)
            except BaseException:
                self._outcomes[:0] = outcomes[n + 1 :]  # a callback raised past Future's guard: keep the rest
                raise

    # ------------------------------------------------------------ commands

    def _on_command(self, command: Command) -> None:
        slot = self.slot
        if isinstance(command, Shutdown):
            self._begin_shutdown(command)
        elif isinstance(command, Reload):
            self._reload(command)
        elif isinstance(command, CancelJob):  # taken while shutting down too: a caller may still leave
            work.cancel(slot, command)
        elif self._shutdown is not None:
            _refuse(command)
        elif slot.budget.failed is not None and isinstance(command, QueuedJob) and not self.queue.barrier_queued():
            self.decide(command.future, error=slot.failed_error())
        elif isinstance(command, QueuedSwitch) and (w := self._switch_is_noop(command)) is not None:
            self.decide(command.future, result=already_loaded(w.mode, w.pid))
        else:
            self.queue.append(command, mode_in_force=slot.mode_ahead)

    def _switch_is_noop(self, switch: QueuedSwitch) -> WorkerHandle | None:
        """The worker, if this switch, placed at the tail, would change
        nothing: its mode is loaded and nothing queued or under way can
        change it first. A restart always changes something."""
        w = self.slot.serving()
        if switch.force or w is None or w.mode != switch.mode or not self.queue.all_in(w.mode):
            return None
        return w

    def _reload(self, command: Reload) -> None:
        old, self.config = self.config, command.config
        self.slot.budget.config = command.config
        self.slot.standby.reconfigure(command.config)
        log.info("configuration reloaded from %s: modes %s", command.config.source, sorted(command.config.modes))
        if not self.slot.standby_wanted():
            self.slot.standby.stop()  # the reload is answered once the spare is reaped
        if command.config.device != old.device:
            log.warning("device changes take effect when the supervisor restarts; keeping %r", old.device)
        w = self.slot.worker
        if w is not None and old.mode(w.mode) != command.config.mode(w.mode):
            log.warning(
                "mode %r is loaded with its old entry; the new one applies when it is next loaded (restart() does it now)",
                w.mode,
            )
        self._after_standbys.append((command.future, None, None))

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Move queued work to the worker as far as its state allows."""
        slot = self.slot
        work.recycle_if_due(slot)
        while True:
            w = slot.worker
            if slot.switch is not None or slot.recycle:
                return
            if w is not None and (w.state not in (WorkerState.READY, WorkerState.BUSY)
                                  or len(w.in_flight) >= self.config.window):  # fmt: skip
                return
            item = self.queue.next(slot.mode, slot.turn_since)
            if item is None:
                if self._shutdown is not None and (w is None or not w.in_flight):
                    work.drain(slot)
                return
            if w is not None and w.in_flight and (isinstance(item, QueuedSwitch) or item.mode not in (None, w.mode)):
                return  # a barrier, or a job for another mode: after what is in flight
            if isinstance(item, QueuedSwitch):
                if not self._start_switch(item):
                    return
                continue
            if slot.budget.failed is not None:
                self.queue.take(item)
                self.decide(item.future, error=slot.failed_error())
                continue
            needed = item.mode or slot.mode
            if needed is None:
                self.queue.take(item)
                why = f" ({slot.mode_error})" if slot.mode_error else ""
                self.decide(item.future, error=NoModeLoaded(
                    f"job {item.id} ({item.task!r}) names no mode and none is loaded{why}; pass mode= or call switch_mode()"
                ))  # fmt: skip
                continue
            if w is None or w.mode != needed:
                if w is None and needed == slot.mode and slot.budget.backing_off():
                    return  # backing off before respawning the mode that just died
                work.begin_switch(slot, QueuedSwitch(needed, None))
                return
            jobs = self._batch(item, w)
            if not jobs:
                return  # a batch waits a moment for more jobs, or for the worker to be idle
            for job in jobs:
                self.queue.take(job)
            if not work.dispatch(slot, jobs, w):
                return

    def _batch(self, job: QueuedJob, w: WorkerHandle) -> list[QueuedJob]:
        """What to hand ``w`` with ``job``: ``job`` alone, or, for a task whose
        handler takes a batch, the jobs right behind it for that task, up to
        ``max_batch``, once the worker is idle. A short batch waits up to
        ``max_delay_ms`` after its oldest job came, for more; [] means wait."""
        slot, key = self.slot, (Deadline.BATCH, self.slot.key)
        limits = slot.batch_limits(w, job)
        if limits is None:
            return [job]
        if w.in_flight:
            return []  # the jobs gather while the worker runs: the next batch is fuller
        size = int(limits["max_batch"])
        run = self.queue.run_of(job, job.task, size, MAX_FRAMES - 1)
        due = job.queued_at + limits["max_delay_ms"] / 1000
        if len(run) < size and self._shutdown is None and time.monotonic() < due:
            self.deadlines.set(key, due)
            return []
        self.deadlines.clear(key)
        return run

    def _start_switch(self, item: QueuedSwitch) -> bool:
        """An explicit switch or restart at the head. False: it must wait (the
        pump stops for now); True: it was answered or begun."""
        slot, w = self.slot, self.slot.worker
        same_mode = item.mode in (None, slot.mode)
        if slot.budget.failed is None and not item.force and same_mode and w is None and slot.budget.backing_off():
            return False  # a same-mode switch is a respawn: it waits out the backoff like one
        self.queue.take(item)
        if slot.budget.failed is not None or item.force or not same_mode:
            slot.budget.reset()  # an operator's word (leaving failed, restart()) or a new mode: a fresh budget
        if item.mode is None:  # restart() of whatever mode is in force
            if slot.mode is None:
                self.decide(item.future, error=NoModeLoaded("restart(): no mode is loaded; call switch_mode()"))
                return True
            item.mode = slot.mode
        if not item.force and w is not None and w.state is WorkerState.READY and w.mode == item.mode:
            self.decide(item.future, result=already_loaded(item.mode, w.pid))
            return True
        work.begin_switch(slot, item)
        return False

    # ------------------------------------------------------------ shutdown

    def _begin_shutdown(self, command: Shutdown) -> None:
        self._shutdown_waiters.append(command.future)
        self.slot.standby.stop()
        if self._shutdown is None:
            self._shutdown = command
            log.info("shutting down (%s)", "drain" if command.drain else "no drain")
        if command.drain and command.timeout is not None:  # the tightest of all the callers' bounds
            deadline = time.monotonic() + command.timeout
            current = self.deadlines.get(Deadline.DRAIN)
            self.deadlines.set(Deadline.DRAIN, min(deadline, current) if current is not None else deadline)
        if not command.drain:
            self.deadlines.clear(Deadline.DRAIN)
            self._cancel_everything(JobCancelled("cancelled by shutdown(drain=False)"))

    def _cancel_everything(self, error: GpuvisorError) -> None:
        """Fail queued work, the switch under way and the jobs in flight with
        ``error``, and stop the worker."""
        slot = self.slot
        for item in self.queue.take_all():
            self.decide(item.future, error=error)
        if slot.switch is not None:
            self.decide(slot.switch.request.future, error=error)
            slot.switch = None
        w = slot.worker
        if w is not None:
            for job in w.in_flight:
                self.decide(job.future, error=error)
            w.in_flight.clear()
            if w.state not in (WorkerState.STOPPING, WorkerState.EXITED):
                ending.stop(slot, "shutdown without drain")

    def _abort(self, error: GpuvisorError) -> None:
        """The loop itself failed: stop the worker, waiting (no loop is left to
        wait for its pidfd), and give every Future the loop ever accepted an
        outcome, wherever it was when the loop died. Outcomes already decided
        in the failed turn go out first, as decided."""
        self._hand_out()
        w = self.slot.worker
        if w is not None:
            try:
                stop_and_reap(w.proc, self.config.stop_timeout, kill_now=True)
            except BaseException:  # noqa: BLE001 - last resort
                log.exception("could not stop worker pid %d", w.pid)
        for future in list(self._accepted):
            settle(future, error=error)

    def _end_standbys(self) -> None:
        """The loop is done: the spares, stopped without waiting so far, are
        reaped now (SIGKILLed processes: moments)."""
        pool = self.slot.standby
        pool.stop()
        deadline = time.monotonic() + 5.0
        while pool.stopping and time.monotonic() < deadline:
            pool.reap()
            time.sleep(0.005)

    # ------------------------------------------------------------ status

    def _publish(self, state: str | None = None) -> None:
        self.published_at = time.monotonic()  # read by Supervisor.healthy(): is the loop turning?
        slot = self.slot
        w, sw = slot.worker, slot.switch
        if state is None:
            state = "draining" if self._shutdown is not None else "failed" if slot.budget.failed else "running"
        status: Status = {
            "state": state,
            "mode": w.mode if w is not None and w.state in SERVING else None,
            "worker_state": w.state.value if w is not None else "none",
            "worker_pid": w.pid if w is not None else None,
            "generation": self._generation,
            "queued": len(self.queue),
            "waiting": self.queue.waiting(),
            "in_flight": len(w.in_flight) if w is not None else 0,
            "window": self.config.window,
            "restarts": slot.restarts,
            "jobs_done": slot.jobs_done,
            "switching_to": sw.mode if sw is not None else None,
            "reclaiming": sw is not None and sw.waiting_for is not None,
            "standby_pid": slot.standby.pid,
            "standby_ready": slot.standby.ready,
            "standby_paused": slot.standby.paused,
            "last_error": slot.mode_error,
            "failed_reason": slot.budget.failed,
            "idle_unloaded": slot.idle_unloaded,
            "oom_recycles": slot.oom_recycles,
            "batches": dict(slot.batches),
            "device": slot.device.kind if slot.device.index is None else f"cuda:{slot.device.index}",
            "gpu_unavailable": slot.gpu_unavailable,
            "worker_rss_bytes": slot.memory.get("worker_rss_bytes"),
            "worker_vram_bytes": slot.memory.get("worker_vram_bytes"),
            "worker_torch": slot.memory.get("worker_torch"),
            "gpu": slot.gpu,  # type: ignore[typeddict-item]
            "config": self.config.source,
        }
        self._status = MappingProxyType(status)


def _refuse(command: Command) -> None:
    if isinstance(command, Shutdown):
        settle(command.future, result=None)
    elif command.future is not None:
        settle(command.future, error=ShuttingDown("the supervisor is shut down; it accepts no new work"))
