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
from collections.abc import Callable, Container
from concurrent.futures import Future
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import zmq

from protocol import GpuvisorError, JobCancelled, NoModeLoaded, ShuttingDown
from protocol.messages import MAX_FRAMES
from supervisor.config import Config
from supervisor.engine import ending, inbox, work
from supervisor.engine.commands import CancelJob, Command, Follow, QueuedJob, QueuedSwitch, Reload, Shutdown, Unload
from supervisor.engine.deadlines import Deadline, Deadlines
from supervisor.engine.devices import choose_devices
from supervisor.engine.link import WorkerLink
from supervisor.engine.process import Processes
from supervisor.engine.queue import JobQueue
from supervisor.engine.slot import Slot
from supervisor.engine.worker_handle import WorkerHandle, WorkerState
from supervisor.events import Subscription, event
from supervisor.futures import settle
from supervisor.mailbox import Mailbox
from supervisor.metrics import Metrics, outcome_of
from supervisor.status import Status, already_loaded, not_started

log = logging.getLogger("gpuvisor")

_IDLE_POLL_S = 1.0  # upper bound on a poll: the snapshot stays fresh for healthy() even with no events
_NO_PIDFD_POLL_S = 0.05  # how often to look for the worker's exit where pidfd_open is missing


class Engine:
    """The loop and everything it owns. ``link``, ``processes`` and ``clock``
    are the worker socket, the OS calls on worker processes and the time;
    by default the real ones, made on the loop thread. A test passes fakes
    and turns the loop by hand with ``open()``, ``step()`` and ``close()``
    (``tests/helpers/fake_world.py``), as the thread does in ``_main``."""

    def __init__(self, config: Config, *, link: WorkerLink | None = None, processes: Processes | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.config = config
        self.clock = clock
        self.processes = processes or Processes()
        self._link = link
        self.owner_pid = os.getpid()
        self.mailbox: Mailbox[Command] = Mailbox()
        self._thread = threading.Thread(target=self._main, name="gpuvisor-loop", daemon=True)
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None
        self._status: MappingProxyType = MappingProxyType(not_started())
        self.published_at = 0.0
        # Counted on the loop thread (and by job Futures' callbacks wherever they
        # settle); read by any thread that scrapes.
        self.metrics = Metrics(lambda: self._status, lambda: (self.config.modes, self.tasks))
        # Everything below belongs to the loop thread.
        self.queue = JobQueue(max_wait=lambda mode: self.config.max_wait_for(mode), clock=clock)
        self.deadlines = Deadlines(clock)
        # Made by the loop thread as it starts (_main), before any other use:
        # a slot per device, in the configuration's order (the first is the
        # status's top-level worker).
        self.link: WorkerLink
        self.slots: list[Slot] = []
        self.device_names: list[str] = []
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
        # Who follows the events (each a bounded queue), and how many events were built for them: none
        # while nobody follows, so the phases cost nothing then.
        self.followers: list[Subscription] = []
        self.told = 0
        self._drain: _DrainTally | None = None  # since shutdown began: what the drain has done

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
        """Each configured mode: its loader, whether it is loaded now (and
        on which devices), and its tasks (None until a worker of that mode
        has said READY)."""
        config, tasks = self.config, dict(self.tasks)
        devices = self._status.get("devices") or []
        out = {}
        for name, spec in sorted(config.modes.items()):
            on = [d["name"] for d in devices if d["mode"] == name]
            out[name] = {"loader": spec.loader, "loaded": bool(on), "devices": on, "tasks": tasks.get(name)}
        return out

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

    def tell(self, name: str, **fields: Any) -> None:
        """An event for whoever follows; nothing at all while nobody does.
        A follower that closed its queue is forgotten here."""
        followers = self.followers
        if not followers:
            return
        self.told += 1
        told = event(name, **fields)
        for sub in followers:
            sub.put(told)
        if any(sub.closed for sub in followers):
            self.followers = [sub for sub in followers if not sub.closed]

    def next_generation(self) -> int:
        self._generation += 1
        return self._generation

    @property
    def shutting_down(self) -> bool:
        return self._shutdown is not None

    # ------------------------------------------------------------ the thread

    def open(self) -> None:
        """The worker link and a slot per device; raises what went wrong."""
        self.link = self._link or WorkerLink()
        try:
            chosen = choose_devices(self.config.device_settings())
            names = [name for name, _ in chosen]
            for spec in self.config.modes.values():
                if unknown := [d for d in spec.devices if d not in names]:
                    raise ValueError(f"mode {spec.name!r} names device {unknown[0]!r}; the devices are {names}")
            self.slots = [Slot(self, choice, key, name) for key, (name, choice) in enumerate(chosen)]
            self.device_names = names
        except BaseException:
            for slot in self.slots:
                slot.standby.stop()
            self.link.close()
            raise
        self._publish()

    def close(self) -> None:
        """The loop is over (done, or crashed): the spares reaped, a last
        status, every outcome handed out, the followers told, the socket
        closed, and every command still posted refused."""
        self._end_standbys()
        self._publish(state="stopped")
        self._hand_out()
        self._tell_stopped()
        self.link.close()
        for command in self.mailbox.close():
            _refuse(command)
        for waiter in self._shutdown_waiters:
            settle(waiter, result=None)

    def _main(self) -> None:
        try:
            self.open()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._boot_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 - logged here once; every Future gets the error
            log.exception("gpuvisor loop crashed; stopping the worker and failing all work")
            self._abort(GpuvisorError("the supervisor's loop crashed; see its log"))
        finally:
            self.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.mailbox.fd, zmq.POLLIN)
        poller.register(self.link.socket, zmq.POLLIN)
        watched: set[int] = set()
        seen: list[tuple[int | None, int | None]] = []
        slots = self.slots
        while not self.finished():
            # The workers' fds change only when a worker starts or ends (or
            # closes its stderr): the poller is told then, not every turn.
            fds = [(w.pidfd, w.stderr_fd) if (w := slot.worker) is not None else (None, None) for slot in slots]
            if fds != seen:
                seen = fds
                wanted = {fd for pair in fds for fd in pair if fd is not None}
                for fd in watched - wanted:
                    poller.unregister(fd)
                for fd in wanted - watched:
                    poller.register(fd, zmq.POLLIN)
                watched = wanted
            without_pidfd = any(w is not None and w.pidfd is None for w in (slot.worker for slot in slots))
            longest = _NO_PIDFD_POLL_S if without_pidfd else _IDLE_POLL_S
            self.step(dict(poller.poll(math.ceil(self.deadlines.wait(longest) * 1000))))
        for fd in watched:
            poller.unregister(fd)

    def step(self, ready: Container | None = None) -> None:
        """One turn of the loop. ``ready``: what the poll found readable (the
        mailbox's fd, the worker socket, workers' pidfds and stderr); None
        looks at everything, as a test's turn does."""
        slots = self.slots
        # 1. news from the workers, before commands: a command must see the
        # worker as it is now (a switch to a mode whose worker just died is not a no-op).
        for slot in slots:
            w = slot.worker
            if w is not None and w.stderr_fd is not None and (ready is None or w.stderr_fd in ready):
                w.pump_stderr()
        if ready is None or self.link.socket in ready:
            for got in self.link.receive(self._packed()):
                inbox.handle(self._sender(got.identity), got)
        # 2. exits. Without a pidfd, look every turn.
        for slot in slots:
            w = slot.worker
            if w is not None and (w.pidfd is None or ready is None or w.pidfd in ready):
                ending.notice_exit(slot)
        # 3. commands
        if ready is None or self.mailbox.fd in ready:
            self._take_commands()
        # 4. deadlines
        for name in self.deadlines.due():
            if isinstance(name, tuple):  # a slot's
                work.on_deadline(slots[name[1]], name[0])
            else:
                self.deadlines.clear(name)
                log.warning("shutdown drain ran out of time; cancelling what is left")
                self._cancel_everything(JobCancelled("shutdown's drain timeout passed before this job ran"))
        # 5. a worker's end
        for slot in slots:
            ending.conclude(slot)
        if self._after_standbys and not any(slot.standby.stopping for slot in slots):
            self._outcomes.extend(self._after_standbys)
            self._after_standbys.clear()
        # 6. the pump
        self._pump()
        for slot in slots:
            slot.refresh_deadlines()
        if self._drain is not None:
            self._drain_progress()
        # 7. publish, then hand out
        self._publish()
        self._hand_out()

    def _packed(self) -> set[int]:
        """The jobs in flight whose answers go on as they came (a door's)."""
        return {job.id for slot in self.slots if slot.worker is not None for job in slot.worker.in_flight if job.packed}

    def _sender(self, identity: bytes) -> Slot:
        """The slot whose worker (of any generation: each has its own) sent
        from ``identity``; the first slot for a stranger, which drops it."""
        for slot in self.slots:
            w = slot.worker
            if w is not None and identity in (w.identity, w.heartbeat_identity):
                return slot
        return self.slots[0]

    def finished(self) -> bool:
        """Shut down, and nothing is left: no worker alive, nothing queued."""
        return self._shutdown is not None and all(s.idle() for s in self.slots) and not self.queue

    def _take_commands(self) -> None:
        commands = self.mailbox.take_all()
        for command in commands:
            if command.future is not None:
                self._accepted.add(command.future)
            if isinstance(command, QueuedJob):
                command.future.add_done_callback(functools.partial(self._job_ended, command, self.clock()))
        for command in commands:
            self._on_command(command)
        if len(self.queue) > self.config.max_queue:
            # Only cancelled jobs can push it past max_queue (their slots are
            # back); drop them now rather than when they reach the head.
            self.queue.drop_cancelled()

    def _job_ended(self, job: QueuedJob, since: float, future: Future) -> None:
        """Counted wherever the job's Future settles: on this thread, or on a
        caller's that cancelled it while queued."""
        self.metrics.job_ended(job.ran_in or job.mode, job.task, outcome_of(future), self.clock() - since)

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

    # ------------------------------------------------------------ placement

    def mode_in_force(self) -> str | None:
        """The mode a job that names none runs in, when nothing queued names
        one: the mode most recently put in force on any device."""
        latest = max(self.slots, key=lambda s: s.mode_since)
        return latest.mode_ahead

    def may_run(self, slot: Slot, mode: str | None) -> bool:
        """``slot`` may run jobs of ``mode`` now: the mode allows the device,
        it is not broken there, and the device holds it already or the mode
        holds fewer devices than its ``replicas``."""
        if slot.breakers.broken(mode) or not self._allows(mode, slot):
            return False
        spec = self.config.mode(mode) if mode is not None else None
        if spec is None or mode == slot.mode_ahead:
            return True
        if slot.refused.get(spec.name, 0.0) > self.clock():
            return False
        holders = sum(1 for s in self.slots
                      if s is not slot and s.mode_ahead == mode and not s.breakers.broken(mode)
                      and spec.allows(s.name))  # fmt: skip
        return holders < spec.replicas

    def can_serve(self, mode: str | None) -> bool:
        """Some device where ``mode`` is not broken may run its jobs (now or
        once another mode's turn ends)."""
        return any(not s.breakers.broken(mode) and self._allows(mode, s) for s in self.slots)

    def _allows(self, mode: str | None, slot: Slot) -> bool:
        """``mode``'s ``devices`` include ``slot`` (a mode not configured: any)."""
        spec = self.config.mode(mode) if mode is not None else None
        return spec is None or spec.allows(slot.name)

    def _broken_modes(self, devices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The modes no device may run now, each with the reason and retry
        time of the device where it is tried again soonest."""
        out: dict[str, dict[str, Any]] = {}
        for device in devices:
            for mode, entry in device["broken"].items():
                if mode in self.config.modes and not self.can_serve(mode):
                    kept = out.get(mode)
                    soon = entry["retry_in_s"] if entry["retry_in_s"] is not None else float("inf")
                    if kept is None or soon < (kept["retry_in_s"] if kept["retry_in_s"] is not None else float("inf")):
                        out[mode] = entry
        return out

    def _free_first(self) -> list[Slot]:
        """The order slots are offered work: the one free the longest first,
        so a job whose mode no device holds goes to the longest-idle one."""
        return sorted(self.slots, key=_free_longest)

    # ------------------------------------------------------------ commands

    def _on_command(self, command: Command) -> None:
        in_force = self.mode_in_force()
        if isinstance(command, Follow):  # taken while shutting down too: a drain is worth following
            self._follow(command.subscription)
        elif isinstance(command, Shutdown):
            self._begin_shutdown(command)
        elif isinstance(command, Reload):
            self._reload(command)
        elif isinstance(command, CancelJob):  # taken while shutting down too: a caller may still leave
            work.cancel(self._holder(command.target), command)
        elif self._shutdown is not None:
            _refuse(command)
        elif isinstance(command, Unload):
            work.unload(next(s for s in self.slots if s.name == command.device), command)
        elif (isinstance(command, QueuedJob) and not self.queue.barrier_queued()
              and not self.can_serve(mode := command.mode or in_force)):  # fmt: skip
            self.decide(command.future, error=self._broken_error(mode))
        elif isinstance(command, QueuedSwitch) and (w := self._switch_is_noop(command)) is not None:
            next(s for s in self.slots if s.worker is w).mode_since = self.clock()  # the caller's word: in force
            self.decide(command.future, result=already_loaded(w.mode, w.pid))
        else:
            if isinstance(command, QueuedSwitch) or self.followers:  # a switch's wait is logged too
                self._tell_waiting(command)
            self.queue.append(command, mode_in_force=in_force)

    def _holder(self, future: Future) -> Slot:
        """The slot whose worker holds the job of ``future``, else the first
        (a queued job is cancelled in the queue, whichever slot asks)."""
        for slot in self.slots:
            w = slot.worker
            if w is not None and any(j.future is future for j in w.in_flight):
                return slot
        return self.slots[0]

    def _broken_error(self, mode: str | None) -> GpuvisorError:
        """Why no device may run ``mode``'s jobs: it is broken on each that
        could (the one tried again soonest speaks)."""
        broken = [s for s in self.slots if mode is not None and s.breakers.broken(mode)]
        if not broken or mode is None:
            return GpuvisorError("no device may run this job")
        return min(
            (s.broken_error(mode) for s in broken), key=lambda e: float("inf") if e.retry_in is None else e.retry_in
        )

    def _switch_is_noop(self, switch: QueuedSwitch) -> WorkerHandle | None:
        """The worker, if this switch, placed at the tail, would change
        nothing: its mode is loaded (on the device it names, if it names
        one) and nothing queued or under way can change it first. A restart
        always changes something."""
        if switch.force or switch.mode is None or not self.queue.all_in(switch.mode):
            return None
        for slot in self.slots:
            w = slot.serving()
            if w is not None and w.mode == switch.mode and switch.device in (None, slot.name):
                return w
        return None

    def _reload(self, command: Reload) -> None:
        old, self.config = self.config, command.config
        log.info("configuration reloaded from %s: modes %s", command.config.source, sorted(command.config.modes))
        if command.config.device_settings() != old.device_settings():
            log.warning("device changes take effect when the supervisor restarts; keeping %r", old.device_settings())
        for slot in self.slots:
            slot.breakers.reconfigure(command.config)
            slot.standby.reconfigure(command.config)
            if not slot.standby_wanted():
                slot.standby.stop()  # the reload is answered once the spare is reaped
            w = slot.worker
            if w is not None and old.mode(w.mode) != command.config.mode(w.mode):
                log.warning("mode %r is loaded with its old entry on %s; the new one applies when it is next loaded "
                            "(restart() does it now)", w.mode, slot.name)  # fmt: skip
        self._after_standbys.append((command.future, None, None))

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Move queued work to the workers as far as their states allow, the
        device free the longest first."""
        for slot in self.slots:
            work.recycle_if_due(slot)
        if self.queue:  # a slot takes work only from the queue: an empty one, nothing to place
            for slot in self._free_first():
                self._pump_slot(slot)
        if self._shutdown is not None and not self.queue:
            for slot in self.slots:
                w = slot.worker
                if slot.switch is None and (w is None or not w.in_flight):
                    work.drain(slot)

    def _pump_slot(self, slot: Slot) -> None:
        while True:
            w = slot.worker
            if slot.switch is not None or slot.recycle:
                return
            if w is not None and (w.state not in (WorkerState.READY, WorkerState.BUSY)
                                  or len(w.in_flight) >= self.config.window):  # fmt: skip
                return
            item = self.queue.next(slot.mode, slot.turn_since, lambda mode: self.may_run(slot, mode))
            if item is None:
                return
            if isinstance(item, QueuedSwitch):
                if self._switch_target(item) is not slot:
                    return  # a barrier for another device: nothing behind it runs before it
                if w is not None and w.in_flight:
                    return  # after what is in flight
                if not self._start_switch(item, slot):
                    return
                continue
            if w is not None and w.in_flight and item.mode not in (None, w.mode):
                return  # a job for another mode: after what is in flight
            needed = item.mode or slot.mode
            if needed is None:
                self.queue.take(item)
                why = f" ({slot.mode_error})" if slot.mode_error else ""
                self.decide(item.future, error=NoModeLoaded(
                    f"job {item.id} ({item.task!r}) names no mode and none is loaded{why}; pass mode= or call switch_mode()"
                ))  # fmt: skip
                continue
            if w is None or w.mode != needed:
                if w is None and needed == slot.mode and slot.breakers.of(needed).backing_off():
                    return  # backing off before respawning the mode that just died
                work.begin_switch(slot, QueuedSwitch(needed, None))
                return
            jobs = self._batch(item, w, slot)
            if not jobs:
                return  # a batch waits a moment for more jobs, or for the worker to be idle
            for job in jobs:
                self.queue.take(job)
            if not work.dispatch(slot, jobs, w):
                return

    def _batch(self, job: QueuedJob, w: WorkerHandle, slot: Slot) -> list[QueuedJob]:
        """What to hand ``w`` with ``job``: ``job`` alone, or, for a task whose
        handler takes a batch, the jobs right behind it for that task, up to
        ``max_batch``, once the worker is idle. A short batch waits up to
        ``max_delay_ms`` after its oldest job came, for more, when the last
        batch of its task held more than one job (callers send at once: the
        wait fills the batch); after a batch of one it goes at once (a
        caller that sends its next job when the last one answers would wait
        for nothing on every job). [] means wait."""
        key = slot.at(Deadline.BATCH)
        limits = slot.batch_limits(w, job)
        if limits is None:
            return [job]
        if w.in_flight:
            return []  # the jobs gather while the worker runs: the next batch is fuller
        size = int(limits["max_batch"])
        run = self.queue.run_of(job, job.task, size, MAX_FRAMES - 1)
        due = job.queued_at + limits["max_delay_ms"] / 1000
        alone = slot.last_batch.get((w.mode, job.task), 1) == 1
        if len(run) < size and self._shutdown is None and not alone and self.clock() < due:
            self.deadlines.set(key, due)
            return []
        self.deadlines.clear(key)
        return run

    def _switch_target(self, item: QueuedSwitch) -> Slot:
        """The device an explicit switch or restart applies to, decided once:
        the one it names; else, for a switch, a device that holds its mode
        (the switch is then a no-op) or the mode may use, the least busy
        and longest free; for a restart of no mode, a failed device first."""
        if item.device is None:
            allowed = [s for s in self.slots if self._allows(item.mode, s)]
            failed = [s for s in allowed if s.failed_reason()] if item.force else []
            wanted = item.mode if item.mode is not None or not item.force else self.mode_in_force()
            holders = [
                s
                for s in allowed
                if s.mode_ahead is not None
                and not s.breakers.broken(s.mode_ahead)
                and (s.mode_ahead == wanted or (item.force and item.mode is None))
            ]
            holders.sort(key=lambda s: (s.mode_ahead != wanted, _free_longest(s)))
            target = min(failed, key=_free_longest) if failed else holders[0] if holders else None
            item.device = (target or min(allowed or self.slots, key=_free_longest)).name
        return next(s for s in self.slots if s.name == item.device)

    def _start_switch(self, item: QueuedSwitch, slot: Slot) -> bool:
        """An explicit switch or restart at the head, for ``slot``. False: it
        must wait (the pump stops for now); True: it was answered or begun."""
        w = slot.worker
        same_mode = item.mode in (None, slot.mode)
        target = item.mode or slot.mode
        budget = slot.breakers.of(target) if target is not None else None
        if (
            budget is not None
            and budget.failed is None
            and not item.force
            and same_mode
            and w is None
            and budget.backing_off()
        ):
            return False  # a same-mode switch is a respawn: it waits out the backoff like one
        self.queue.take(item)
        if budget is not None and (budget.failed is not None or item.force or not same_mode):
            budget.reset()  # an operator's word (a broken mode tried now, restart()) or a new mode: a fresh budget
        if item.mode is None:  # restart() of whatever mode is in force
            if slot.mode is None:
                self.decide(item.future, error=NoModeLoaded("restart(): no mode is loaded; call switch_mode()"))
                return True
            item.mode = slot.mode
        if not item.force and w is not None and w.state is WorkerState.READY and w.mode == item.mode:
            slot.mode_since = self.clock()
            self.decide(item.future, result=already_loaded(item.mode, w.pid))
            return True
        work.begin_switch(slot, item)
        return False

    # ------------------------------------------------------------ shutdown

    def _begin_shutdown(self, command: Shutdown) -> None:
        self._shutdown_waiters.append(command.future)
        for slot in self.slots:
            slot.standby.stop()
        if self._shutdown is None:
            self._shutdown = command
            log.info("shutting down (%s)", "drain" if command.drain else "no drain")
            self._drain = _DrainTally(sum(slot.jobs_done for slot in self.slots), self.clock())
        if command.drain and command.timeout is not None:  # the tightest of all the callers' bounds
            deadline = self.clock() + command.timeout
            current = self.deadlines.get(Deadline.DRAIN)
            self.deadlines.set(Deadline.DRAIN, min(deadline, current) if current is not None else deadline)
        if not command.drain:
            self.deadlines.clear(Deadline.DRAIN)
            self._cancel_everything(JobCancelled("cancelled by shutdown(drain=False)"))

    def _cancel_everything(self, error: GpuvisorError) -> None:
        """Fail queued work, the switches under way and the jobs in flight
        with ``error``, and stop the workers."""
        for item in self.queue.take_all():
            if self._drain is not None and isinstance(item, QueuedJob) and not item.future.done():
                self._drain.cancelled += 1
            self.decide(item.future, error=error)
        for slot in self.slots:
            if slot.switch is not None:
                self.decide(slot.switch.request.future, error=error)
                slot.tell_switch(slot.switch, "failed", error=error.message)
                slot.switch = None
            w = slot.worker
            if w is not None:
                for job in w.in_flight:
                    if self._drain is not None and not job.future.done():
                        self._drain.cancelled += 1
                    self.decide(job.future, error=error)
                w.in_flight.clear()
                if w.state not in (WorkerState.STOPPING, WorkerState.EXITED):
                    ending.stop(slot, "shutdown without drain")

    def _abort(self, error: GpuvisorError) -> None:
        """The loop itself failed: stop the workers, waiting (no loop is left
        to wait for their pidfds), and give every Future the loop ever
        accepted an outcome, wherever it was when the loop died. Outcomes
        already decided in the failed turn go out first, as decided."""
        self._hand_out()
        for slot in self.slots:
            w = slot.worker
            if w is not None:
                try:
                    self.processes.stop_and_reap(w.proc, self.config.stop_timeout, kill_now=True)
                except BaseException:  # noqa: BLE001 - last resort
                    log.exception("could not stop worker pid %d", w.pid)
        for future in list(self._accepted):
            settle(future, error=error)

    def _end_standbys(self) -> None:
        """The loop is done: the spares, stopped without waiting so far, are
        reaped now (SIGKILLed processes: moments)."""
        pools = [slot.standby for slot in self.slots]
        for pool in pools:
            pool.stop()
        deadline = time.monotonic() + 5.0  # real processes, waited for in real time
        while any(pool.stopping for pool in pools) and time.monotonic() < deadline:
            for pool in pools:
                pool.reap()
            time.sleep(0.005)

    # ------------------------------------------------------------ events

    def _follow(self, sub: Subscription) -> None:
        """A new follower gets what is under way first: where each device
        stands, the phase of each switch, the drain."""
        devices = [{"name": s.name, "mode": d["mode"], "worker_pid": d["worker_pid"], "switching_to": d["switching_to"]}
                   for s, d in zip(self.slots, self._status.get("devices") or [], strict=False)]  # fmt: skip
        sub.put(event("following", state=self._status["state"], queued=len(self.queue),
                      in_flight=self._status["in_flight"], devices=devices))  # fmt: skip
        self.followers.append(sub)
        followers, self.followers = self.followers, [sub]  # the state now, to the new follower alone
        try:
            for slot in self.slots:
                if slot.switch is not None:
                    slot.tell_switch(slot.switch, slot.switch_phase())
            if self._drain is not None:
                self._drain.left = -1
                self._drain_progress()
        finally:
            self.followers = followers

    def _tell_waiting(self, command: QueuedJob | QueuedSwitch) -> None:
        """Work queued behind a switch: how much is ahead of it, and which
        switch it waits for (a follower's ``submit`` shows it)."""
        ahead = len(self.queue) + sum(len(s.worker.in_flight) for s in self.slots if s.worker is not None)
        switching = [{"device": s.name, "mode": s.switch.mode, "phase": s.switch_phase()}
                     for s in self.slots if s.switch is not None]  # fmt: skip
        if isinstance(command, QueuedSwitch):
            if ahead or switching:
                why = "restart" if command.force else "switch"
                log.info("%s to mode %r queued behind %d jobs%s", why, command.mode, ahead,
                         "".join(f" and the switch to {s['mode']!r} on {s['device']}" for s in switching))  # fmt: skip
                self.tell("switch", phase="queued", mode=command.mode, device=command.device, why=why, ahead=ahead,
                          switching=switching)  # fmt: skip
        elif switching or self.queue.barrier_queued():
            self.tell("job_waiting", job=command.id, task=command.task, mode=command.mode, ahead=ahead,
                      switching=switching)  # fmt: skip

    def _drain_progress(self) -> None:
        """While stopping: the jobs left, logged and told each time it changes."""
        drain = self._drain
        if drain is None:
            return
        in_flight = sum(len(s.worker.in_flight) for s in self.slots if s.worker is not None)
        left = len(self.queue) + in_flight
        if left == drain.left:
            return
        if drain.left != -1:
            log.info("draining: jobs left %d (%d queued, %d running)", left, len(self.queue), in_flight)
        drain.left = left
        shutdown = self._shutdown
        self.tell("drain", jobs_left=left, queued=len(self.queue), in_flight=in_flight,
                  drain=shutdown is not None and shutdown.drain, finished=self._drain_finished(),
                  cancelled=drain.cancelled, elapsed=round(self.clock() - drain.began, 3))  # fmt: skip

    def _drain_finished(self) -> int:
        drain = self._drain
        return sum(slot.jobs_done for slot in self.slots) - drain.jobs_done if drain is not None else 0

    def _tell_stopped(self) -> None:
        """The loop is over: what the stop did, then every follower's queue is closed."""
        drain = self._drain
        finished, cancelled = self._drain_finished(), drain.cancelled if drain is not None else 0
        seconds = self.clock() - drain.began if drain is not None else 0.0
        if drain is not None:
            log.info("stopped: jobs finished %d, cancelled %d, in %.2fs", finished, cancelled, seconds)
        self.tell("stopped", finished=finished, cancelled=cancelled, seconds=round(seconds, 3))
        for sub in self.followers:
            sub.close()
        self.followers = []

    # ------------------------------------------------------------ status

    def _publish(self, state: str | None = None) -> None:
        self.published_at = self.clock()  # read by Supervisor.healthy(): is the loop turning?
        slots = self.slots
        devices = [slot.describe() for slot in slots]
        broken = self._broken_modes(devices)
        if state is None:
            failed = bool(broken) and len(broken) == len(self.config.modes)  # no mode can serve
            state = "draining" if self._shutdown is not None else "failed" if failed else "running"
        first = devices[0]
        reasons = [f"{mode}: {entry['reason']}" for mode, entry in broken.items()]
        status: Status = {
            "state": state,
            **first,  # type: ignore[typeddict-item]  # the first device's worker, at the top as with one device
            "generation": self._generation,
            "queued": len(self.queue),
            "waiting": self.queue.waiting(),
            "window": self.config.window,
            "in_flight": sum(d["in_flight"] for d in devices),
            "restarts": sum(d["restarts"] for d in devices),
            "jobs_done": sum(d["jobs_done"] for d in devices),
            "oom_recycles": sum(d["oom_recycles"] for d in devices),
            "failed_reason": f"every mode is broken ({'; '.join(reasons)})" if state == "failed" else None,
            "broken_modes": broken,
            "devices": devices,
            "config": self.config.source,
        }
        del status["name"], status["broken"]  # type: ignore[typeddict-item]  # the device's own keys
        self._status = MappingProxyType(status)


@dataclass
class _DrainTally:
    jobs_done: int  # the devices' jobs done when the stop began
    began: float
    cancelled: int = 0
    left: int = -1  # the jobs left when last told


def _free_longest(slot: Slot) -> tuple[bool, bool, float]:
    """Placement's order: free devices before busy ones, a device holding no
    mode before one whose mode would be evicted, then the longest free."""
    return (slot.busy(), slot.mode_ahead is not None, slot.free_since)


def _refuse(command: Command) -> None:
    if isinstance(command, Follow):
        command.subscription.put(event("stopped", finished=0, cancelled=0, seconds=0.0))
        command.subscription.close()
    elif isinstance(command, Shutdown):
        settle(command.future, result=None)
    elif command.future is not None:
        settle(command.future, error=ShuttingDown("the supervisor is shut down; it accepts no new work"))
