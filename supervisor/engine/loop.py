"""The engine: one thread owns the worker socket, the queue and the devices.

::

      API threads (Supervisor, AsyncSupervisor, the daemon)
        | post(command) -> Mailbox + one byte on its wake-up pipe
        v
    +------------------------------ loop thread ------------------------------+
    |  poll([mailbox, worker socket, worker pidfd + stderr], next deadline)   |
    |  step():                                                                |
    |   read_workers    stderr; messages (inbox): HELLO READY RESULT CHUNK .. |
    |   notice_exits    a pidfd fired: reap the worker (last words may follow)|
    |   take_commands   submit, switch, restart, reload, cancel, shutdown     |
    |   fire_deadlines  heartbeat, load, job, stop, drain, reclaim (one table)|
    |   conclude_ends   a reaped worker whose last words are in: its end, once|
    |   place_and_dispatch  queued work to the devices, or a switch begun     |
    |   publish         a fresh status snapshot ...                           |
    |   hand_out        ... then the outcomes decided in the turn             |
    +-------------------------------------------------------------------------+

Nothing here is touched by another thread: API threads only post commands
and read the published snapshot, so there are no locks around state. No
phase waits: stopping a worker is a state with a deadline, and its pidfd
says when to reap it. A worker's end is handled in ``conclude_ends`` alone,
so no handler ever re-enters another. Workers are spawned from this thread
on purpose: PR_SET_PDEATHSIG fires when the thread that forked the child
ends, and this thread lives as long as the supervisor does.

``step()`` is one turn without the poll: the thread is ``poll`` + ``step``,
and a test steps the engine by hand against a fake world.
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
from types import MappingProxyType
from typing import Any

import zmq

from protocol import GpuvisorError
from supervisor.config import Config
from supervisor.engine import inbox, intake, pump
from supervisor.engine.commands import Command, QueuedJob
from supervisor.engine.deadlines import Deadlines
from supervisor.engine.device import Device
from supervisor.engine.device_state import Parts
from supervisor.engine.devices import choose_devices
from supervisor.engine.followers import Followers
from supervisor.engine.link import WorkerLink
from supervisor.engine.outcomes import SPARES_REAPED, Outcomes
from supervisor.engine.process import Processes
from supervisor.engine.queue import JobQueue
from supervisor.engine.settings import Settings
from supervisor.engine.snapshot import snapshot
from supervisor.engine.stopping import Stopping
from supervisor.futures import settle
from supervisor.mailbox import Mailbox
from supervisor.metrics import Metrics, outcome_of
from supervisor.status import Status, not_started

log = logging.getLogger("gpuvisor")

_IDLE_POLL_S = 1.0  # upper bound on a poll: the snapshot stays fresh for healthy() even with no events
_NO_PIDFD_POLL_S = 0.05  # how often to look for the worker's exit where pidfd_open is missing


class Engine:
    """The loop and everything it owns. ``link``, ``processes`` and ``clock``
    are the worker socket, the OS calls on worker processes and the time;
    by default the real ones, made on the loop thread. A test passes fakes
    and turns the loop by hand with ``open()``, ``step()`` and ``close()``
    (``tests/helpers/fake_world.py``), as the thread does in ``_main``."""

    def __init__(
        self,
        config: Config,
        *,
        link: WorkerLink | None = None,
        processes: Processes | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = Settings(config)  # the one holder of the configuration: a reload is one assignment
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
        self.tasks: dict[str, list[str]] = {}  # mode -> its tasks, as its worker said in READY
        # Counted on the loop thread (and by job Futures' callbacks wherever they
        # settle); read by any thread that scrapes.
        self.metrics = Metrics(lambda: self._status, lambda: (self.config.modes, self.tasks))
        # Everything below belongs to the loop thread.
        self.queue = JobQueue(max_wait=lambda mode: self.settings.config.max_wait_for(mode), clock=clock)
        self.deadlines = Deadlines(clock)
        self.outcomes = Outcomes()
        self.followers_of_events = Followers()
        # Made by the loop thread as it starts (open), before any other use:
        # a device each, in the configuration's order (the first is the
        # status's top-level worker).
        self.parts: Parts
        self.stopping: Stopping
        self.device_names: list[str] = []
        # Every Future the loop has taken charge of, so that even a crash of the
        # loop itself gives each one an outcome. Weak: a settled Future the
        # caller dropped costs nothing.
        self._accepted: weakref.WeakSet[Future] = weakref.WeakSet()

    @property
    def config(self) -> Config:
        return self.settings.config

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
            intake.refuse(command)

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

    @property
    def followers(self) -> list:
        return self.followers_of_events.subscriptions

    @property
    def told(self) -> int:
        return self.followers_of_events.told

    @property
    def link(self) -> WorkerLink:
        return self.parts.link

    # ------------------------------------------------------------ the thread

    def open(self) -> None:
        """The worker link and a device each; raises what went wrong."""
        link = self._link or WorkerLink()
        self.parts = parts = Parts(
            self.settings,
            self.queue,
            self.deadlines,
            link,
            self.processes,
            self.clock,
            self.outcomes,
            self.followers_of_events,
            self.metrics,
            self.tasks,
        )
        self.stopping = Stopping(parts)
        try:
            chosen = choose_devices(self.config.device_settings())
            names = [name for name, _ in chosen]
            for spec in self.config.modes.values():
                if unknown := [d for d in spec.devices if d not in names]:
                    raise ValueError(f"mode {spec.name!r} names device {unknown[0]!r}; the devices are {names}")
            for index, (name, choice) in enumerate(chosen):
                parts.devices.append(Device(parts, choice, index, name))
            self.device_names = names
        except BaseException:
            for device in parts.devices:
                device.standby.stop()
            link.close()
            raise
        self.publish()

    def close(self) -> None:
        """The loop is over (done, or crashed): the spares reaped, a last
        status, every outcome handed out, the followers told, the socket
        closed, and every command still posted refused."""
        self._end_standbys()
        self.publish(state="stopped")
        self.outcomes.hand_out()
        self.stopping.tell_stopped()
        self.parts.link.close()
        for command in self.mailbox.close():
            intake.refuse(command)
        for waiter in self.stopping.waiters:
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
        poller.register(self.parts.link.socket, zmq.POLLIN)
        watched: set[int] = set()
        seen: list[tuple[int | None, int | None]] = []
        devices = self.parts.devices
        while not self.finished():
            # The workers' fds change only when a worker starts or ends (or
            # closes its stderr): the poller is told then, not every turn.
            fds = [(w.pidfd, w.stderr_fd) if (w := d.worker) is not None else (None, None) for d in devices]
            if fds != seen:
                seen = fds
                wanted = {fd for pair in fds for fd in pair if fd is not None}
                for fd in watched - wanted:
                    poller.unregister(fd)
                for fd in wanted - watched:
                    poller.register(fd, zmq.POLLIN)
                watched = wanted
            without_pidfd = any(w is not None and w.pidfd is None for w in (d.worker for d in devices))
            longest = _NO_PIDFD_POLL_S if without_pidfd else _IDLE_POLL_S
            self.step(dict(poller.poll(math.ceil(self.deadlines.wait(longest) * 1000))))
        for fd in watched:
            poller.unregister(fd)

    def finished(self) -> bool:
        """Shut down, and nothing is left: no worker alive, nothing queued."""
        return self.parts.stopping and all(d.idle() for d in self.parts.devices) and not self.queue

    # ------------------------------------------------------------ one turn

    def step(self, ready: Container | None = None) -> None:
        """One turn of the loop. ``ready``: what the poll found readable (the
        mailbox's fd, the worker socket, workers' pidfds and stderr); None
        looks at everything, as a test's turn does."""
        self.read_workers(ready)  # before commands: a command sees each worker as it is now
        self.notice_exits(ready)
        self.take_commands(ready)
        self.fire_deadlines()
        self.conclude_ends()
        self.place_and_dispatch()
        self.publish()
        self.outcomes.hand_out()

    def read_workers(self, ready: Container | None) -> None:
        """What the workers wrote to stderr, and what they sent."""
        parts = self.parts
        for device in parts.devices:
            w = device.worker
            if w is not None and w.stderr_fd is not None and (ready is None or w.stderr_fd in ready):
                w.stderr.pump()
        if ready is None or parts.link.socket in ready:
            for got in parts.link.receive(self._packed()):
                inbox.handle(self._sender(got.identity), got)

    def notice_exits(self, ready: Container | None) -> None:
        """A worker whose pidfd fired is reaped; without a pidfd, looked at every turn."""
        for device in self.parts.devices:
            w = device.worker
            if w is not None and (w.pidfd is None or ready is None or w.pidfd in ready):
                device.notice_exit()

    def take_commands(self, ready: Container | None) -> None:
        if ready is not None and self.mailbox.fd not in ready:
            return
        commands = self.mailbox.take_all()
        for command in commands:
            if command.future is not None:
                self._accepted.add(command.future)
            if isinstance(command, QueuedJob):
                command.future.add_done_callback(functools.partial(self._job_ended, command, self.clock()))
        for command in commands:
            intake.take(self.parts, self.stopping, command, self._status)
        if len(self.queue) > self.config.max_queue:
            # Only cancelled jobs can push it past max_queue (their places are
            # back); drop them now rather than when they reach the head.
            self.queue.drop_cancelled()

    def fire_deadlines(self) -> None:
        """Each deadline due goes to its owner (a device, or the shutdown's stop)."""
        for name, owner in self.deadlines.due():
            owner.on_deadline(name)

    def conclude_ends(self) -> None:
        """The end of each worker reaped whose last words are in; the outcomes
        that waited for the spares, once those are reaped."""
        devices = self.parts.devices
        for device in devices:
            device.conclude()
        if self.outcomes.holding(SPARES_REAPED) and not any(d.standby.stopping for d in devices):
            self.outcomes.release(SPARES_REAPED)

    def place_and_dispatch(self) -> None:
        pump.place_and_dispatch(self.parts)
        for device in self.parts.devices:
            device.refresh_deadlines()
        self.stopping.progress()

    def publish(self, state: str | None = None) -> None:
        self.published_at = self.clock()  # read by Supervisor.healthy(): is the loop turning?
        self._status = MappingProxyType(snapshot(self.parts, state))

    # ------------------------------------------------------------ helpers

    def _job_ended(self, job: QueuedJob, since: float, future: Future) -> None:
        """Counted wherever the job's Future settles: on this thread, or on a
        caller's that cancelled it while queued."""
        self.metrics.job_ended(job.ran_in or job.mode, job.task, outcome_of(future), self.clock() - since)

    def _packed(self) -> set[int]:
        """The jobs in flight whose answers go on as they came (a door's)."""
        return {job.id for d in self.parts.devices if d.worker is not None for job in d.worker.in_flight if job.packed}

    def _sender(self, identity: bytes) -> Device:
        """The device whose worker (of any generation: each has its own) sent
        from ``identity``; the first device for a stranger, which drops it."""
        devices = self.parts.devices
        for device in devices:
            w = device.worker
            if w is not None and identity in (w.identity, w.heartbeat_identity):
                return device
        return devices[0]

    def _abort(self, error: GpuvisorError) -> None:
        """The loop itself failed: stop the workers, waiting (no loop is left
        to wait for their pidfds), and give every Future the loop ever
        accepted an outcome, wherever it was when the loop died. Outcomes
        already decided in the failed turn go out first, as decided."""
        self.outcomes.hand_out()
        for device in self.parts.devices:
            w = device.worker
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
        pools = [device.standby for device in self.parts.devices]
        for pool in pools:
            pool.stop()
        deadline = time.monotonic() + 5.0  # real processes, waited for in real time
        while any(pool.stopping for pool in pools) and time.monotonic() < deadline:
            for pool in pools:
                pool.reap()
            time.sleep(0.005)
