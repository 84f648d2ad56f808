"""The core loop: one thread owns the worker socket, the queue and the worker.

::

      API threads (Supervisor, AsyncSupervisor)
        | post(command) -> Mailbox + one byte on the wake-up pipe
        v
    +---------------------------- loop thread ----------------------------+
    |  poll([wake-up pipe, ROUTER socket, worker pidfd], next deadline)   |
    |    wake-up  -> take commands: submit, switch, shutdown              |
    |    ROUTER   -> HELLO / READY / LOAD_FAILED / RESULT / FAILURE / HB  |
    |    pidfd    -> the worker exited: reap it, settle what it held      |
    |    deadline -> load timeout, heartbeat timeout, job timeout, drain  |
    |  then pump(): move the FIFO forward as far as the worker allows     |
    |  then publish a fresh status snapshot                               |
    +---------------------------------------------------------------------+

Nothing here is touched by another thread: API threads only post commands
and read the published snapshot, so there are no locks around state. The
worker is spawned from this thread on purpose: PR_SET_PDEATHSIG fires when
the thread that forked the child ends, and this thread lives as long as the
supervisor does.

The FIFO holds jobs and switch barriers. A job runs in the mode in force when
it reaches the head (its own ``mode=`` if it names one); a switch runs only
when nothing is in flight. So jobs submitted before a switch run in the old
mode, jobs after it in the new one.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import zmq

from protocol import (
    MAX_MESSAGE_BYTES,
    Chunk,
    Drain,
    Failure,
    GpuvisorError,
    Heartbeat,
    Hello,
    JobCancelled,
    JobTimeout,
    Kind,
    Load,
    LoadFailed,
    ModeLoadError,
    NoModeLoaded,
    OutOfMemory,
    ProtocolError,
    Ready,
    Result,
    ShuttingDown,
    SupervisorFailed,
    WorkerCrashed,
    decode_from_worker,
    encode,
    error_from_wire,
)
from protocol.frames import drain, small
from protocol.messages import peek
from supervisor.commands import Command, Mailbox, QueuedJob, QueuedSwitch, Reload, Shutdown, settle
from supervisor.config import Config
from supervisor.gpu import GpuMeter, choose_device, process_rss
from supervisor.process import describe_exit, spawn_worker, stop_and_reap, worker_argv
from supervisor.standby import Standby
from supervisor.worker_handle import WorkerHandle, WorkerState

log = logging.getLogger("gpuvisor")

_SERVING = frozenset({WorkerState.READY, WorkerState.BUSY, WorkerState.DRAINING})
# Before HELLO the worker's I/O thread may not exist yet (load_timeout covers
# that); while DRAINING the exit deadline does.
_HEARTBEATING = frozenset({WorkerState.LOADING, WorkerState.READY, WorkerState.BUSY})
_IDLE_POLL_S = 1.0  # upper bound on a poll, so deadlines are checked even with no events
_NO_PIDFD_POLL_S = 0.05  # how often to poll the worker's exit where pidfd_open is missing
_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]{0,200}")  # what a standby may be asked to import
_LAST_WORDS_QUIET_S = 0.02  # after a death: the worker's socket quiet this long means all it sent is in
_LAST_WORDS_MAX_S = 0.5
_RECLAIM_POLL_S = 0.02  # how often NVML is read while a switch waits for memory to come back


@dataclass
class _SwitchInProgress:
    mode: str
    request: QueuedSwitch
    previous: str | None
    started: float
    reclaim: dict[str, Any] = field(default_factory=dict)  # what the worker this switch stopped gave back
    waiting: _Retired | None = None  # a stopped worker whose memory must be back before the spawn
    reclaim_deadline: float = 0.0
    next_poll: float = 0.0
    stop_seconds: float | None = None  # stopping and reaping the worker this switch replaced
    standby: bool = False  # the new worker was the warm standby


@dataclass
class _Retired:
    """The last worker stopped, until its memory is verified back."""

    pid: int
    baseline_used: int | None  # device used before it started
    used_before: int | None  # device used just before it stopped
    rss_bytes: int | None  # its RSS at the last sample (host memory, never VRAM)
    stopping_since: float


def _already_loaded(mode: str, w: WorkerHandle) -> dict[str, Any]:
    return {"mode": mode, "status": "already_loaded", "pid": w.pid}


# --------------------------------------------------------------------- core


class Core:
    def __init__(self, config: Config):
        self.config = config
        self.owner_pid = os.getpid()
        self.mailbox = Mailbox()
        self._thread = threading.Thread(target=self._main, name="gpuvisor-loop", daemon=True)
        self._ready = threading.Event()
        self._boot_error: BaseException | None = None
        self._status: MappingProxyType = MappingProxyType({"state": "not_started"})
        self.published_at = 0.0
        # Everything below belongs to the loop thread.
        self._queue: collections.deque[QueuedJob | QueuedSwitch] = collections.deque()
        self._worker: WorkerHandle | None = None
        # The mode in force: loaded, being loaded, or wanted again after its
        # worker died or its last load failed. Only a switch changes it.
        self._mode: str | None = None
        self._mode_served = False  # the mode in force has been READY: a death while reloading it is a respawn's
        self._mode_error: str | None = None  # why the mode in force is not loaded, after a failed switch
        self._switch: _SwitchInProgress | None = None
        # Jobs sent to the worker, in order: the head runs, the rest wait in
        # the worker's socket (up to ``window``), so it never idles for a round trip.
        self._in_flight: collections.deque[QueuedJob] = collections.deque()
        self._shutdown: Shutdown | None = None
        self._shutdown_waiters: list[Future] = []
        self._drain_deadline: float | None = None
        self._exit_deadline: float | None = None
        self._generation = 0
        self._restarts = 0
        self._deaths: collections.deque[float] = collections.deque()  # unexpected deaths in the window
        self._respawn_at = 0.0  # backoff: no automatic respawn before this
        self._failed: str | None = None  # why the restart budget ran out
        self._jobs_done = 0
        self._running = True
        # Every Future the loop has taken charge of, so that even a crash of the
        # loop itself gives each one an outcome. Weak: a settled Future the
        # caller dropped costs nothing.
        self._accepted: weakref.WeakSet[Future] = weakref.WeakSet()
        # Outcomes decided during a turn of the loop, handed out after the
        # turn's status snapshot is published: when a caller sees its Future
        # done, status() already tells the same story.
        self._outcomes: list[tuple[Future, Any, BaseException | None]] = []
        self._endpoint_dir = ""
        self._router: zmq.Socket | None = None
        self._device = choose_device(config.device)
        meter = GpuMeter.open(self._device.index) if self._device.index is not None else self._device.reason
        self._meter: GpuMeter | None = meter if isinstance(meter, GpuMeter) else None
        self._gpu_unavailable: str | None = None if self._meter is not None else str(meter)
        self._memory: dict[str, Any] = {}  # the worker's memory at the last heartbeat
        self._gpu: dict[str, Any] | None = self._meter.snapshot() if self._meter is not None else None
        self._retired: _Retired | None = None
        self._idle_unloaded: str | None = None  # the mode idle_unload_s stopped, until it loads again
        self._oom_recycles = 0
        self._recycle = False  # an OOM asked for a fresh worker once the window is empty
        self._exiting: WorkerHandle | None = None  # the worker whose death is being handled
        self._standby: Standby | None = None
        self._preload: tuple[str, ...] = ()  # heavy libraries modes were seen to import: what a standby preloads
        self._heavy_modes: dict[str, bool] = {}  # mode -> it imported such libraries when it last loaded

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
            self._refuse(command)

    @property
    def status(self) -> dict[str, Any]:
        return dict(self._status)

    def join(self, timeout: float | None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_loop_thread(self) -> bool:
        """Future callbacks run on the loop thread; waiting there would deadlock."""
        return threading.current_thread() is self._thread

    # ---------------------------------------------------------- loop thread

    def _main(self) -> None:
        ctx = zmq.Context()
        try:
            self._endpoint_dir = tempfile.mkdtemp(prefix="gpuvisor-")
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Memory stays bounded: libzmq drops the connection of a peer that
            # sends more. A worker treats a dropped connection as fatal (exit 4),
            # so its job still gets an outcome. A frame between the limit and
            # this is refused by decode_from_worker, which ends the worker too.
            router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
            self.endpoint = f"ipc://{self._endpoint_dir}/worker.sock"
            router.bind(self.endpoint)
            self._router = router
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._boot_error = exc
            self._ready.set()
            ctx.term()
            return
        self._publish()
        self._ready.set()
        try:
            self._loop()
        except BaseException:  # noqa: BLE001 - logged here once; every Future gets the error
            log.exception("gpuvisor loop crashed; stopping the worker and failing all work")
            self._abort_everything(GpuvisorError("the supervisor's loop crashed; see its log"))
        finally:
            self._stop_standby()
            self._publish(state="stopped")
            self._hand_out()
            router.close(linger=0)
            ctx.term()
            shutil.rmtree(self._endpoint_dir, ignore_errors=True)
            for command in self.mailbox.close():
                self._refuse(command)
            for waiter in self._shutdown_waiters:
                settle(waiter, result=None)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.mailbox.fd, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        watched: set[int] = set()
        while self._running:
            w = self._worker
            wanted = {fd for fd in (w.pidfd, w.stderr_fd) if fd is not None} if w is not None else set()
            for fd in watched - wanted:
                poller.unregister(fd)
            for fd in wanted - watched:
                poller.register(fd, zmq.POLLIN)
            watched = wanted
            events = dict(poller.poll(self._poll_timeout() * 1000))
            # The worker's news first: a command must see the worker as it is
            # now (a switch to a mode whose worker just died is not a no-op).
            if w is not None and w is self._worker and w.stderr_fd in events:
                w.pump_stderr()
            if self._router in events:
                self._drain_router()
            if w is None or w.pidfd is None or w.pidfd in events:  # a waitpid per turn costs; the pidfd says when
                self._notice_exit()
            if len(self._queue) > self.config.max_queue:
                # Only cancelled jobs can push it past max_queue (their slots are
                # back); drop them now rather than when they reach the head.
                self._queue = collections.deque(i for i in self._queue if i.future is None or not i.future.cancelled())
            if self.mailbox.fd in events:
                commands = self.mailbox.take_all()
                for command in commands:
                    if command.future is not None:
                        self._accepted.add(command.future)
                for command in commands:
                    self._on_command(command)
                commands = command = None  # hold no caller's Future past its time
            self._check_deadlines()
            self._pump()
            self._publish()
            self._hand_out()
        for fd in watched:
            poller.unregister(fd)

    def _settle(self, future: Future | None, *, result: Any = None, error: BaseException | None = None) -> None:
        if future is not None:
            self._outcomes.append((future, result, error))

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

    def _notice_exit(self) -> bool:
        """Handle the worker's exit if it has happened; True if it had."""
        if self._worker is not None and self._worker.proc.poll() is not None:
            self._on_worker_exit()
            return True
        return False

    def _poll_timeout(self) -> float:
        now = time.monotonic()
        wait = _IDLE_POLL_S
        if self._worker is not None and self._worker.pidfd is None:
            wait = _NO_PIDFD_POLL_S
        for deadline in self._deadlines():
            wait = min(wait, deadline - now)
        return max(wait, 0.0)

    def _deadlines(self) -> list[float]:
        out: list[float] = []
        w = self._worker
        if w is not None and w.state in _HEARTBEATING:
            out.append(w.last_seen + self.config.heartbeat_timeout)
        if w is not None and w.state in (WorkerState.SPAWNED, WorkerState.LOADING):
            out.append(w.started_at + self.config.load_timeout)
        if self._in_flight and self._in_flight[0].deadline is not None:
            out.append(self._in_flight[0].deadline)
        for d in (self._drain_deadline, self._exit_deadline):
            if d is not None:
                out.append(d)
        if self._respawn_at > time.monotonic() and self._worker is None and self._queue:
            out.append(self._respawn_at)
        if (idle_at := self._idle_unload_at()) is not None:
            out.append(idle_at)
        if self._switch is not None and self._switch.waiting is not None:
            out.append(self._switch.next_poll)
        return out

    def _idle_unload_at(self) -> float | None:
        """When the idle worker is due to be stopped, or None. Only an idle
        worker with nothing queued: never while a job runs or waits."""
        w = self._worker
        if w is None or w.state is not WorkerState.READY or self._queue or self._switch or self._shutdown:
            return None
        idle = self.config.idle_unload_for(w.spec)
        return w.idle_since + idle if idle > 0 else None

    # ------------------------------------------------------------ commands

    def _refuse(self, command: Command) -> None:
        if isinstance(command, Shutdown):
            settle(command.future, result=None)
        elif command.future is not None:
            settle(command.future, error=ShuttingDown("the supervisor is shut down; it accepts no new work"))

    def _on_command(self, command: Command) -> None:
        if isinstance(command, Shutdown):
            self._begin_shutdown(command)
        elif isinstance(command, Reload):
            old, self.config = self.config, command.config
            log.info("configuration reloaded from %s: modes %s", command.config.source, sorted(command.config.modes))
            if not self._standby_wanted():
                self._stop_standby()
            if command.config.device != old.device:
                log.warning("device changes take effect when the supervisor restarts; keeping %r", old.device)
            loaded = self._worker.mode if self._worker is not None else None
            if loaded is not None and old.mode(loaded) != command.config.mode(loaded):
                log.warning(
                    "mode %r is loaded with its old entry; the new one applies when it is next loaded (restart() does it now)",
                    loaded,
                )
            self._settle(command.future, result=None)
        elif self._shutdown is not None:
            self._refuse(command)
        elif self._failed is not None and isinstance(command, QueuedJob) and not self._barrier_queued():
            self._settle(command.future, error=self._failed_error())
        elif isinstance(command, QueuedSwitch) and not command.force and self._switch_is_noop(command.mode):
            self._settle(command.future, result=_already_loaded(command.mode, self._worker))
        else:
            self._queue.append(command)

    def _barrier_queued(self) -> bool:
        """An explicit switch or restart waits in the queue: jobs behind it
        belong to whatever it brings, not to the failed state."""
        return any(isinstance(item, QueuedSwitch) and item.future is not None for item in self._queue)

    def _switch_is_noop(self, mode: str) -> bool:
        """True when this switch, placed at the tail, would change nothing: the
        mode is loaded and nothing queued or under way can change it first."""
        if self._notice_exit():
            return False
        w = self._worker
        if self._switch is not None or w is None or w.state not in (WorkerState.READY, WorkerState.BUSY):
            return False
        if w.mode != mode:
            return False
        return all(
            (isinstance(item, QueuedSwitch) and item.mode == mode)
            or (isinstance(item, QueuedJob) and item.mode in (None, mode))
            for item in self._queue
        )

    # ------------------------------------------------------------ the pump

    def _pump(self) -> None:
        """Advance the FIFO as far as the worker's state allows."""
        self._recycle_if_due()
        while self._queue or self._shutdown is not None:
            if self._switch is not None or len(self._in_flight) >= self.config.window or self._recycle:
                return
            w = self._worker
            if w is not None and w.state in (WorkerState.SPAWNED, WorkerState.LOADING, WorkerState.DRAINING):
                return
            if not self._queue:
                if not self._in_flight:
                    self._finish_drain()
                return
            item = self._queue[0]
            if self._in_flight and (isinstance(item, QueuedSwitch) or item.mode not in (None, w.mode)):
                return  # a barrier, or a job for another mode: after what is in flight
            if isinstance(item, QueuedSwitch):
                if item.future is not None and item.future.cancelled():
                    self._queue.popleft()
                    continue
                same_mode = item.mode in (None, self._mode)
                if self._failed is None and not item.force and same_mode and w is None:
                    if time.monotonic() < self._respawn_at:
                        return  # a same-mode switch is a respawn: it waits out the backoff like one
                self._queue.popleft()
                if self._failed is not None or item.force or not same_mode:
                    # An operator's word (leaving failed, restart()) or a new mode: a fresh budget.
                    if self._failed is not None:
                        log.warning("leaving the failed state: %s requested", "restart" if item.force else "a switch")
                        self._failed = None
                    self._deaths.clear()
                    self._respawn_at = 0.0
                if item.mode is None:  # restart() of whatever mode is in force
                    if self._mode is None:
                        self._settle(
                            item.future, error=NoModeLoaded("restart(): no mode is loaded; call switch_mode()")
                        )
                        continue
                    item.mode = self._mode
                if not item.force and w is not None and w.state is WorkerState.READY and w.mode == item.mode:
                    self._settle(item.future, result=_already_loaded(item.mode, w))
                    continue
                self._begin_switch(item)
                return
            if item.future.cancelled():
                self._queue.popleft()
                continue
            if self._failed is not None:
                self._queue.popleft()
                self._settle(item.future, error=self._failed_error())
                continue
            needed = item.mode or self._mode
            if needed is None:
                self._queue.popleft()
                why = f" ({self._mode_error})" if self._mode_error else ""
                self._settle(
                    item.future,
                    error=NoModeLoaded(
                        f"job {item.id} ({item.task!r}) names no mode and none is loaded{why}; pass mode= or call switch_mode()"
                    ),
                )
                continue
            if w is None or w.mode != needed:
                if w is None and needed == self._mode and time.monotonic() < self._respawn_at:
                    return  # backing off before respawning the mode that just died
                self._begin_switch(QueuedSwitch(needed, None))
                return
            if w.pidfd is None and self._notice_exit():  # without a pidfd, look before sending
                continue
            self._queue.popleft()
            if not self._dispatch(item, w):
                return

    def _dispatch(self, job: QueuedJob, w: WorkerHandle) -> bool:
        """Send ``job`` to the worker; False if the worker is lost."""
        # RUNNING from here on, so cancel() says False for a job that may run.
        if not job.future.running() and not job.future.set_running_or_notify_cancel():
            return True
        queued = len(self._queue)
        if not self._send(w, job.frames):
            # It never reached a worker: it keeps its place, behind the jobs
            # that were in flight (back at the head of the queue now).
            self._queue.insert(len(self._queue) - queued, job)
            return False
        if w.state is WorkerState.READY:
            w.transition(WorkerState.BUSY)
        self._in_flight.append(job)
        if len(self._in_flight) == 1:
            self._start_clock(job)
        return True

    def _start_clock(self, job: QueuedJob) -> None:
        """A job's timeout counts from when it reaches the head of the jobs in
        flight: that is when the worker, which runs them in order, starts it."""
        timeout = job.timeout if job.timeout is not None else (self.config.job_timeout or None)
        job.deadline = time.monotonic() + timeout if timeout else None

    # ------------------------------------------------------------ switching

    def _begin_switch(self, request: QueuedSwitch) -> None:
        """Stop the current worker, wait (without blocking the loop) until its
        memory is back, then spawn the new one: see ``_poll_reclaim``."""
        if request.future is not None and not request.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        w = self._worker
        sw = _SwitchInProgress(request.mode, request, w.mode if w is not None else None, time.monotonic())
        if w is not None:
            self._stop_worker(f"switching to mode {request.mode!r}")
            sw.stop_seconds = time.monotonic() - sw.started
        self._switch = sw
        self._idle_unloaded = None
        r, self._retired = self._retired, None  # also one that died or was unloaded earlier: its memory too
        if r is not None and w is not None:  # figures only for the worker this switch stopped: fresh ones
            sw.reclaim = {"previous_pid": r.pid, "previous_rss_bytes": r.rss_bytes}
        if r is not None and self._meter is not None and r.baseline_used is not None:
            sw.waiting, sw.reclaim_deadline = r, time.monotonic() + self.config.reclaim_timeout
            self._poll_reclaim()
            return
        if sw.reclaim:  # no GPU: the reap was the reclaim; RSS is reported as RSS, never as VRAM
            sw.reclaim.update(
                reclaimed_bytes=None, reclaim_seconds=time.monotonic() - r.stopping_since, reclaim_complete=None
            )
        self._spawn(sw)

    def _poll_reclaim(self) -> None:
        """One NVML reading for the switch waiting on a stopped worker's
        memory: spawn once NVML no longer lists its pid and the device is
        back within the tolerance of its baseline, or once ``reclaim_timeout``
        has passed (logged and reported: another process on the GPU may have
        taken memory meanwhile). Called every 20 ms from the deadlines, so
        the loop keeps answering while it waits."""
        sw = self._switch
        r = sw.waiting
        tolerance = int(self.config.reclaim_tolerance_mib * 1024 * 1024)
        got = self._meter.poll_reclaim(r.pid, r.used_before, r.baseline_used, tolerance, r.stopping_since)
        now = time.monotonic()
        if not got.complete and now < sw.reclaim_deadline:
            sw.next_poll = now + _RECLAIM_POLL_S
            return
        if not got.complete:
            log.warning(
                "VRAM of worker pid %d not verified back within %gs (pid listed: %s, device used %s vs baseline %d)",
                r.pid, self.config.reclaim_timeout, not got.pid_gone, got.used_after, r.baseline_used,
            )  # fmt: skip
        if sw.reclaim:
            sw.reclaim.update(got.as_result(), reclaim_seconds=now - r.stopping_since)  # the kill included
        self._gpu = self._meter.snapshot()
        sw.waiting = None
        self._spawn(sw)

    def _spawn(self, sw: _SwitchInProgress) -> None:
        spec = self.config.mode(sw.mode)
        if spec is None:  # validated at submit; only a config reload could get here
            self._switch_failed(ModeLoadError(f"mode {sw.mode!r} is no longer in the configuration"), forget=True)
            return
        self._generation += 1
        argv = worker_argv(self.config.worker_command, self.endpoint, self._generation, self.config.heartbeat_interval)
        baseline_used = self._device_used()
        standby = self._standby if self._standby is not None and self._takes_standby(sw.mode) else None
        if standby is not None:
            self._standby = None
        proc = standby.activate(self._generation, self.config.heartbeat_interval) if standby is not None else None
        sw.standby = proc is not None
        if proc is not None:
            log.info("worker gen %d is the warm standby pid %d (%d modules preloaded)",
                     self._generation, proc.pid, len(standby.preload))  # fmt: skip
        try:
            proc = proc or spawn_worker(argv, self._device.env)
        except OSError as exc:  # a worker_command that does not exist, say
            self._switch_failed(ModeLoadError(f"could not start a worker with {argv[0]!r}: {exc}"))
            return
        self._worker = WorkerHandle(proc, self._generation, spec)
        self._worker.baseline_used = baseline_used
        if sw.mode != self._mode:
            self._mode_served = False
        self._mode, self._mode_error = sw.mode, None
        log.info("worker gen %d pid %d starting mode %r", self._generation, proc.pid, sw.mode)

    def _switch_done(self, w: WorkerHandle) -> None:
        sw = self._switch
        self._switch = None
        self._mode_served = True
        if sw is None:
            return
        seconds = time.monotonic() - sw.started
        log.info("mode %r ready in %.2fs (load %.2fs), worker pid %d", sw.mode, seconds, w.load_seconds or 0, w.pid)
        if sw.request.future is not None:
            self._settle(
                sw.request.future,
                result={
                    "mode": sw.mode,
                    "status": "restarted" if sw.request.force else "loaded",
                    "previous": sw.previous,
                    "seconds": seconds,
                    "load_seconds": w.load_seconds,
                    "warmup_seconds": w.warmup_seconds,
                    "stop_seconds": sw.stop_seconds,
                    "spawn_seconds": w.hello_at - w.started_at if w.hello_at else None,
                    "standby": sw.standby,
                    "pid": w.pid,
                    **sw.reclaim,
                },
            )
        self._prepare_standby()

    def _takes_standby(self, mode: str) -> bool:
        """Only a mode seen to import the libraries a spare preloads takes it
        (ready, or still importing: it is ahead of a fresh process either
        way). A light mode, or one not yet seen, starts fresh: a spare would
        lend it hundreds of MB of imports it never uses."""
        return self._standby_wanted() and bool(self._heavy_modes.get(mode))

    def _prepare_standby(self) -> None:
        """After each switch: a spare that has imported what the modes were
        seen to import, for the next one (see ``supervisor/standby.py``).
        Only for the built-in worker, and never while shutting down."""
        s = self._standby
        if s is not None and (s.proc.poll() is not None or set(self._preload) - set(s.preload)):
            s.stop()  # died, or preloads less than is now known to be needed
            self._standby = s = None
        if s is None and self._standby_wanted() and self._preload and self._shutdown is None:
            try:
                self._standby = Standby(self.endpoint, self._preload, self._device.env)
            except Exception as exc:  # noqa: BLE001 - a spare is an optimisation: never worth the worker
                log.warning("could not start a warm standby: %s: %s", type(exc).__name__, exc)

    def _standby_wanted(self) -> bool:
        return self.config.warm_standby and not self.config.worker_command

    def _stop_standby(self) -> None:
        if self._standby is not None:
            self._standby.stop()
            self._standby = None

    def _is_respawn(self, sw: _SwitchInProgress | None) -> bool:
        """A switch that only brings back the mode in force, which has served
        since it was put in force, for the jobs waiting on it. A death while
        it loads is retried under the restart budget; a death while loading
        a mode asked for anew fails that switch at once (likely deterministic)."""
        return sw is not None and sw.request.future is None and sw.mode == self._mode and self._mode_served

    def _switch_failed(self, error: GpuvisorError, *, forget: bool = False) -> None:
        """The switch in progress did not produce a READY worker. Its request
        fails, and so does every queued job before the next barrier that would
        run in that mode (it names the mode, or names none): a deterministic
        load failure is paid once per burst, not once per job. The mode stays
        in force (unless ``forget``: it no longer exists), so a later job that
        names no mode tries it again; every failed load counts against the
        restart budget, so retrying a broken mode ends in ``failed``, never in
        a loop."""
        sw = self._switch
        self._switch = None
        if sw.mode != self._mode:
            self._mode_served = False
        self._mode = None if forget else sw.mode
        self._mode_error = f"switch to {sw.mode!r} failed: {error.message}"
        log.error("mode %r failed to load: %s", sw.mode, error.message)
        if sw.request.future is not None:
            self._settle(sw.request.future, error=error)
        self._fail_before_barrier(
            lambda job: (
                ModeLoadError(
                    f"job {job.id} needs mode {sw.mode!r}, which failed to load: {error.message}", **error.details
                )
                if (job.mode or sw.mode) == sw.mode
                else None
            )
        )
        if not forget:
            self._count_death(f"mode {sw.mode!r} failed to load: {error.message}")

    def _fail_before_barrier(self, error_for: Callable[[QueuedJob], GpuvisorError | None]) -> None:
        """Fail the queued jobs ahead of the first switch barrier for which
        ``error_for`` gives an error; jobs behind a barrier belong to it."""
        kept: collections.deque = collections.deque()
        barrier = False
        for item in self._queue:
            barrier = barrier or isinstance(item, QueuedSwitch)
            error = None if barrier else error_for(item)
            if error is not None:
                self._settle(item.future, error=error)
            else:
                kept.append(item)
        self._queue = kept

    # ------------------------------------------------------------ worker messages

    def _send(self, w: WorkerHandle, frames: list) -> bool:
        """Send to the current worker. A refusal (EHOSTUNREACH: its socket is
        gone) means the worker is lost: it is stopped and handled like any
        other death, and the caller learns the message did not go out."""
        try:
            # Arrays (memoryviews) go without a copy; small bytes frames are
            # cheaper copied than wrapped in zmq.Frame objects.
            self._router.send_multipart([w.identity, *frames], copy=small(frames))
            return True
        except zmq.ZMQError as exc:
            self._on_worker_exit(f"stopped taking messages ({exc})")
            return False

    def _drain_router(self) -> None:
        for frames in drain(self._router, copied=2):  # identity and header as bytes; arrays stay in frames
            self._on_frames(frames)

    def _on_frames(self, frames: list) -> None:
        identity, body = frames[0], frames[1:]
        w = self._worker
        if w is None or identity != w.identity or w.state is WorkerState.EXITED:
            log.warning(
                "dropped a message from %r: not the current worker (generation %s)", identity, w.gen if w else None
            )
            return
        try:
            msg = decode_from_worker(body)
        except ProtocolError as exc:
            if self._unreadable_outcome(w, body, exc):
                return
            # Our own child broke the protocol: whatever it was answering is
            # lost, and waiting for an answer that will not come would leave a
            # job without an outcome. End it; the next job gets a fresh worker.
            log.error("worker gen %d sent a malformed message: %s", w.gen, exc)
            self._on_worker_exit(f"sent a malformed message ({exc})", ProtocolError)
            return
        w.last_seen = time.monotonic()
        try:
            self._HANDLERS[type(msg)](self, w, msg)
        except Exception as exc:  # noqa: BLE001 - the loop must outlive any one message
            log.exception("could not handle %s from worker gen %d", msg.kind.value, w.gen)
            if self._worker is w:
                self._on_worker_exit(f"sent a {msg.kind.value} message the supervisor could not handle ({exc})")

    def _unreadable_outcome(self, w: WorkerHandle, body: list, exc: ProtocolError) -> bool:
        """A RESULT, FAILURE or CHUNK whose header names the running job but
        whose value cannot be read: that job alone fails, and the worker, which
        kept to the protocol otherwise, serves on. True if it was one."""
        job = self._in_flight[0] if self._in_flight else None
        kind = peek(body, "k")
        if job is None or kind not in (Kind.RESULT, Kind.FAILURE, Kind.CHUNK) or peek(body, "job") != job.id:
            return False
        log.error("worker gen %d sent a %s for job %d that cannot be read: %s", w.gen, kind, job.id, exc.message)
        error = ProtocolError(f"the worker's {kind} for job {job.id} ({job.task!r}) cannot be read: {exc.message}")
        w.last_seen = time.monotonic()
        if kind == Kind.CHUNK:  # the stream is broken: it ends now; the job's own outcome is still to come
            job.on_chunk, job.stream_broken = None, True
            self._settle(job.future, error=error)
        else:
            self._on_outcome(w, Failure(job.id, error.to_wire()))
        return True

    def _on_hello(self, w: WorkerHandle, msg: Hello) -> None:
        if w.state is not WorkerState.SPAWNED or msg.gen != w.gen:
            log.warning("worker gen %d: unexpected HELLO (gen %d) in state %s", w.gen, msg.gen, w.state.value)
            return
        w.hello_at = time.monotonic()
        path = list(self.config.loader_path) or None
        if self._send(w, encode(Load(w.spec.name, w.spec.loader, w.spec.args, w.spec.warmup, path))):
            w.transition(WorkerState.LOADING)

    def _on_ready(self, w: WorkerHandle, msg: Ready) -> None:
        if w.state is not WorkerState.LOADING or msg.mode != w.mode:
            log.warning("worker gen %d: unexpected READY for %r in state %s", w.gen, msg.mode, w.state.value)
            return
        w.load_seconds = float(msg.load_seconds)
        w.warmup_seconds = msg.warmup_seconds
        self._heavy_modes[msg.mode] = bool(msg.imported)
        if msg.imported:
            names = (m for m in msg.imported if isinstance(m, str) and _MODULE_NAME.fullmatch(m))
            self._preload = tuple(dict.fromkeys([*self._preload, *names]))  # import order kept, no repeats
        w.transition(WorkerState.READY)
        self._sample_memory(w, msg.memory)
        self._switch_done(w)

    def _on_load_failed(self, w: WorkerHandle, msg: LoadFailed) -> None:
        if w.state is not WorkerState.LOADING:
            log.warning("worker gen %d: unexpected LOAD_FAILED in state %s", w.gen, w.state.value)
            return
        remote = error_from_wire(msg.error)
        details = dict(remote.details)
        try:
            w.proc.wait(1.0)  # it exits 3 by itself; let it, so the log shows its own word
        except subprocess.TimeoutExpired:
            pass
        self._stop_worker("its mode failed to load", kill_now=False)
        self._switch_failed(ModeLoadError(f"loading mode {msg.mode!r} raised {remote.message}", **details))

    def _on_outcome(self, w: WorkerHandle, msg: Result | Failure) -> None:
        job = self._in_flight[0] if self._in_flight else None
        if w.state is not WorkerState.BUSY or job is None or job.id != msg.job:
            log.warning("worker gen %d: dropped an outcome for job %d, which is not running", w.gen, msg.job)
            return
        error = error_from_wire(msg.error) if isinstance(msg, Failure) else None
        self._in_flight.popleft()
        self._jobs_done += 1
        if self._in_flight:
            self._start_clock(self._in_flight[0])
        else:
            w.transition(WorkerState.READY)
        self._settle(job.future, result=msg.value if error is None else None, error=error)
        if isinstance(error, OutOfMemory) and self.config.recycle_on_oom:
            self._recycle_after_oom(w, job)

    def _on_chunk(self, w: WorkerHandle, msg: Chunk) -> None:
        job = self._in_flight[0] if self._in_flight else None
        if job is not None and job.id == msg.job and job.stream_broken:
            return  # its reader already has its error
        if w.state is not WorkerState.BUSY or job is None or job.id != msg.job or job.on_chunk is None:
            log.warning("worker gen %d: dropped a chunk for job %d, which is not a stream in flight", w.gen, msg.job)
            return
        if msg.seq != job.chunks + 1:
            self._on_worker_exit(f"sent chunk {msg.seq} of job {job.id} after chunk {job.chunks}", ProtocolError)
            return
        job.chunks = msg.seq
        try:
            job.on_chunk(msg.value)
        except Exception:  # noqa: BLE001 - a reader's failure is not the worker's
            log.exception("job %d: could not deliver chunk %d to its reader", job.id, msg.seq)

    def _on_heartbeat(self, w: WorkerHandle, msg: Heartbeat) -> None:
        self._sample_memory(w, msg.memory)  # last_seen is already updated for every message
        if self._standby is not None and self._standby.proc.poll() is not None:
            log.warning("warm standby pid %d died idle (%s); a new one comes after the next switch",
                        self._standby.pid, describe_exit(self._standby.proc.returncode))  # fmt: skip
            self._stop_standby()

    def _sample_memory(self, w: WorkerHandle, torch_figures: dict | None) -> None:
        """Once a heartbeat, not once a turn: NVML and /proc reads are cheap,
        but not free, and a busy loop turns thousands of times a second."""
        self._memory = {
            "worker_rss_bytes": process_rss(w.pid),
            "worker_vram_bytes": self._meter.process_bytes(w.pid) if self._meter is not None else None,
            "worker_torch": torch_figures,
        }
        self._gpu = self._meter.snapshot() if self._meter is not None else None

    def _recycle_after_oom(self, w: WorkerHandle, job: QueuedJob) -> None:
        """The allocator keeps its fragments after an OOM, so the next job
        would likely fail too: stop the worker now; the next job that needs
        the mode starts a fresh one (none is loaded for nothing, should the
        next thing be a switch or a shutdown). Not a death: the restart
        budget is untouched."""
        self._oom_recycles += 1
        log.warning("job %d (%r) ran out of memory; recycling worker gen %d (recycle_on_oom)", job.id, job.task, w.gen)
        self._recycle = True  # jobs already handed over may have started: they finish first (see _pump)
        self._recycle_if_due()

    def _recycle_if_due(self) -> None:
        if self._recycle and not self._in_flight and self._worker is not None:
            self._recycle = False
            self._stop_worker("recycling after out of memory")  # the mode stays in force: the next job reloads it

    _HANDLERS = {
        Hello: _on_hello,
        Ready: _on_ready,
        LoadFailed: _on_load_failed,
        Result: _on_outcome,
        Chunk: _on_chunk,
        Failure: _on_outcome,
        Heartbeat: _on_heartbeat,
    }

    # ------------------------------------------------------------ exits and deadlines

    def _stop_worker(self, why: str, *, kill_now: bool = False) -> int:
        """Stop and reap the current worker; returns its exit status."""
        w = self._worker
        assert w is not None
        code, used_before = self._reap(w, kill_now)
        log.info("worker gen %d pid %d stopped (%s): %s", w.gen, w.pid, why, describe_exit(code))
        self._retire(w, used_before)
        return code

    def _reap(self, w: WorkerHandle, kill_now: bool) -> tuple[int, int | None]:
        """Stop and reap ``w``; returns its exit status and the device's used
        memory just before, which the reclaim compares against."""
        used_before = self._device_used()
        w.stopping_since = time.monotonic()
        return stop_and_reap(w.proc, self.config.stop_timeout, kill_now=kill_now), used_before

    def _device_used(self) -> int | None:
        if self._meter is None:
            return None
        memory = self._meter.memory()
        return memory[0] if memory is not None else None

    def _retire(self, w: WorkerHandle, used_before: int | None = None) -> None:
        self._recycle = False  # whatever ended it, the next worker is fresh
        if w.state is not WorkerState.EXITED:
            w.transition(WorkerState.EXITED)
        w.close_fds()
        self._worker = None
        self._retired = _Retired(
            w.pid, w.baseline_used, used_before, self._memory.get("worker_rss_bytes"), w.stopping_since
        )
        self._memory = {}

    def _on_worker_exit(self, cause: str | None = None, job_error: type[GpuvisorError] = WorkerCrashed) -> None:
        """The worker died on its own (or we kill it now for a ``cause``):
        settle whatever it held with an error that says how it died and what
        it last wrote, count the death against the restart budget, and leave
        the mode in force so the next job respawns it (after the backoff)."""
        w = self._worker
        assert w is not None
        if self._exiting is w:
            return  # already being handled: a last word of it was malformed
        self._exiting = w
        head = self._in_flight[0] if self._in_flight else None
        try:
            code, used_before = self._reap(w, kill_now=True)
            if self._in_flight:
                self._read_last_words(w)
        finally:
            self._exiting = None
        if self._worker is not w:
            return
        if self._in_flight and self._in_flight[0] is not head:
            # The job the cause was about (a timeout) answered in its last words;
            # the one now at the head was merely running when we killed.
            cause, job_error = f"was killed while running the next job ({cause})", WorkerCrashed
        state = w.state
        how = cause or describe_exit(code, loading=state in (WorkerState.SPAWNED, WorkerState.LOADING))
        self._retire(w, used_before)  # reads the last of its stderr
        tail = w.stderr_tail()
        said = ("; its last stderr lines:\n    " + "\n    ".join(tail)) if tail else ""
        if state is WorkerState.DRAINING:
            log.info("worker gen %d pid %d drained and %s", w.gen, w.pid, describe_exit(code))
            self._exit_deadline = None
            self._running = False
            return
        log.error("worker gen %d pid %d %s (state %s)", w.gen, w.pid, how, state.value)
        if state in (WorkerState.SPAWNED, WorkerState.LOADING):
            what = f"worker pid {w.pid} {how} while loading mode {w.mode!r}"
            if self._is_respawn(self._switch):
                # The mode was serving and is still wanted: an OOM kill or an
                # operator's kill during a reload is a death like any other.
                # The jobs wait for the next respawn, after the backoff.
                self._switch = None
                self._restarts += 1
                self._count_death(what)  # may enter the failed state, which fails them
                return
            self._switch_failed(ModeLoadError(f"{what}{said}", stderr_tail=tail))
            return
        self._restarts += 1
        job = self._in_flight.popleft() if self._in_flight else None
        self._requeue_unstarted()  # before the budget's verdict, which may fail the queue
        self._count_death(f"worker pid {w.pid} (mode {w.mode!r}) {how}")  # may enter the failed state
        if job is None:
            return
        if job_error is WorkerCrashed and job.retries > 0 and self._failed is None:
            job.retries -= 1
            log.warning("job %d (%r) will run again (%d retries left)", job.id, job.task, job.retries)
            self._queue.appendleft(job)  # first in line, as it was
            return
        message = f"worker pid {w.pid} (mode {w.mode!r}) {how} while running job {job.id} ({job.task!r}){said}"
        if self._failed is not None:
            message += "; the restart budget is exhausted, so it was not retried"
        self._settle(job.future, error=job_error(message, stderr_tail=tail))

    def _read_last_words(self, w: WorkerHandle) -> None:
        """Take in what the dead worker sent before it died. With a window it
        runs the next job as soon as it has sent a result, so that result can
        still be on its way when the death is seen; judging the jobs now
        would fail a job that succeeded. Its socket is closed, so what it sent
        arrives within moments: read until the socket has been quiet for
        ``_LAST_WORDS_QUIET_S`` (at most ``_LAST_WORDS_MAX_S``)."""
        now = time.monotonic()
        quiet_until, give_up = now + _LAST_WORDS_QUIET_S, now + _LAST_WORDS_MAX_S
        while now < give_up and self._worker is w:
            if self._router.poll(max(0.0, min(quiet_until, give_up) - now) * 1000):
                self._drain_router()
                quiet_until = time.monotonic() + _LAST_WORDS_QUIET_S
            elif time.monotonic() >= quiet_until:
                return
            now = time.monotonic()

    def _requeue_unstarted(self) -> None:
        """Jobs sent behind the running one had not started (the worker runs
        them in order): back to the head of the queue, in order, with their
        retries untouched; the next worker runs them."""
        self._queue.extendleft(reversed(self._in_flight))
        self._in_flight.clear()

    def _count_death(self, what: str) -> None:
        """The restart budget, after Erlang/OTP's intensity and period: at most
        ``max_restarts`` unexpected deaths in ``restart_window`` seconds, with
        a growing wait before each respawn; past it, stop respawning."""
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self.config.restart_window:
            self._deaths.popleft()
        n = len(self._deaths)
        if n > self.config.max_restarts:
            self._enter_failed(
                f"{n} worker deaths in {self.config.restart_window:g}s (max_restarts={self.config.max_restarts}); "
                f"the last: {what}. switch_mode() or restart() clears this"
            )
            return
        delay = 0.0 if n <= 1 else min(self.config.restart_backoff * 2 ** (n - 2), self.config.restart_backoff_max)
        self._respawn_at = now + delay
        if delay:
            log.warning("respawn %d in this window: waiting %.2fs first", n, delay)

    def _failed_error(self) -> SupervisorFailed:
        return SupervisorFailed(f"the supervisor is failed: {self._failed}")

    def _enter_failed(self, reason: str) -> None:
        """Stop respawning. Jobs queued before the next switch barrier fail
        now, as will new ones, until an explicit switch_mode() or restart()."""
        log.error("restart budget exhausted: %s", reason)
        self._failed = reason
        self._fail_before_barrier(lambda job: self._failed_error())

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self._switch is not None and self._switch.waiting is not None and now >= self._switch.next_poll:
            self._poll_reclaim()
        idle_at = self._idle_unload_at()
        if idle_at is not None and now >= idle_at:
            mode = self._worker.mode
            self._stop_worker(f"idle for {self.config.idle_unload_for(self._worker.spec):g}s (idle_unload_s)")
            self._idle_unloaded = mode  # the mode stays in force: the next job loads it again
        head = self._in_flight[0] if self._in_flight else None
        if head is not None and head.deadline is not None and now >= head.deadline:
            self._drain_router()  # its answer may have just arrived: then it was in time after all
            head = self._in_flight[0] if self._in_flight else None
        w = self._worker
        if w is not None:
            if head is not None and head.deadline is not None and now >= head.deadline:
                job = head
                limit = job.timeout or self.config.job_timeout
                self._on_worker_exit(f"was killed: the job ran past its {limit:g}s timeout", JobTimeout)
            elif (
                w.state in (WorkerState.SPAWNED, WorkerState.LOADING) and now >= w.started_at + self.config.load_timeout
            ):
                self._on_worker_exit(f"did not say READY within load_timeout={self.config.load_timeout:g}s")
            elif w.state in _HEARTBEATING and now - w.last_seen >= self.config.heartbeat_timeout:
                self._on_worker_exit(
                    f"hung: no message for {now - w.last_seen:.1f}s (heartbeat_timeout={self.config.heartbeat_timeout:g}s)"
                )
            elif self._exit_deadline is not None and now >= self._exit_deadline:
                log.warning("worker pid %d did not exit within %gs of DRAIN", w.pid, self.config.stop_timeout)
                self._stop_worker("drain took too long")
                self._exit_deadline = None
                self._running = False
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._drain_deadline = None
            log.warning("shutdown drain ran out of time; cancelling what is left")
            self._cancel_everything(JobCancelled("shutdown's drain timeout passed before this job ran"))

    # ------------------------------------------------------------ shutdown

    def _begin_shutdown(self, command: Shutdown) -> None:
        self._shutdown_waiters.append(command.future)
        self._stop_standby()
        if self._shutdown is None:
            self._shutdown = command
            log.info("shutting down (%s)", "drain" if command.drain else "no drain")
        if command.drain and command.timeout is not None:  # the tightest of all the callers' bounds
            deadline = time.monotonic() + command.timeout
            self._drain_deadline = min(deadline, self._drain_deadline or deadline)
        if not command.drain:
            self._drain_deadline = None
            self._cancel_everything(JobCancelled("cancelled by shutdown(drain=False)"))

    def _cancel_everything(self, error: GpuvisorError) -> None:
        """Fail queued work, the switch under way and the job in flight with
        ``error``, and stop the worker at once."""
        queued, self._queue = self._queue, collections.deque()
        for item in queued:
            if item.future is not None:
                self._settle(item.future, error=error)
        if self._switch is not None and self._switch.request.future is not None:
            self._settle(self._switch.request.future, error=error)
        self._switch = None
        for job in self._in_flight:
            self._settle(job.future, error=error)
        self._in_flight.clear()
        if self._worker is not None:
            self._stop_worker("shutdown without drain")
        self._running = False

    def _finish_drain(self) -> None:
        """Nothing queued or in flight: send DRAIN, or stop if there is no worker."""
        w = self._worker
        if w is None:
            self._running = False
            return
        if w.state is WorkerState.READY and self._send(w, encode(Drain())):
            w.transition(WorkerState.DRAINING)
            self._exit_deadline = time.monotonic() + self.config.stop_timeout

    def _abort_everything(self, error: GpuvisorError) -> None:
        """The loop itself failed: stop the worker and give every Future the
        loop ever accepted an outcome, wherever it was when the loop died.
        Outcomes already decided in the failed turn go out first, as decided."""
        self._hand_out()
        try:
            self._cancel_everything(error)
        except BaseException:  # noqa: BLE001 - last resort; the worker must still die
            if self._worker is not None:
                stop_and_reap(self._worker.proc, 1.0, kill_now=True)
        self._hand_out()
        for future in list(self._accepted):
            settle(future, error=error)

    # ------------------------------------------------------------ status

    def _publish(self, state: str | None = None) -> None:
        self.published_at = time.monotonic()  # read by Supervisor.healthy(): is the loop turning?
        w = self._worker
        if state is None:
            state = "draining" if self._shutdown is not None else "failed" if self._failed else "running"
        self._status = MappingProxyType(
            {
                "state": state,
                "mode": w.mode if w is not None and w.state in _SERVING else None,
                "worker_state": w.state.value if w is not None else "none",
                "worker_pid": w.pid if w is not None else None,
                "generation": self._generation,
                "queued": len(self._queue),
                "in_flight": len(self._in_flight),
                "window": self.config.window,
                "restarts": self._restarts,
                "jobs_done": self._jobs_done,
                "switching_to": self._switch.mode if self._switch is not None else None,
                "reclaiming": self._switch is not None and self._switch.waiting is not None,
                "standby_pid": self._standby.pid if self._standby is not None else None,
                "standby_ready": self._standby is not None and self._standby.ready(),
                "last_error": self._mode_error,
                "failed_reason": self._failed,
                "idle_unloaded": self._idle_unloaded,
                "oom_recycles": self._oom_recycles,
                "device": self._device.kind if self._device.index is None else f"cuda:{self._device.index}",
                "gpu_unavailable": self._gpu_unavailable,
                "worker_rss_bytes": self._memory.get("worker_rss_bytes"),
                "worker_vram_bytes": self._memory.get("worker_vram_bytes"),
                "worker_torch": self._memory.get("worker_torch"),
                "gpu": self._gpu,
                "config": self.config.source,
            }
        )
