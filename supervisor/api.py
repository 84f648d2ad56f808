"""The API in this process: ``Supervisor`` (threads, returns
``concurrent.futures.Future``), the sync face ``supervisor.surface``
declares, over the engine (``supervisor.aio`` awaits it for asyncio).

A call only checks its arguments, encodes the job in the caller's thread
(so a payload msgpack cannot carry fails right here, at ``submit()``) and
posts a command; the loop thread does everything else. That keeps the
faces free of shared state and lets many threads submit at once.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from protocol import GpuvisorError, QueueFull, RequestTooLarge, ShuttingDown, UnknownMode, WrongDevice, encode_job
from protocol.arrays import nbytes
from supervisor import at_exit
from supervisor import config as config_mod
from supervisor.arguments import check_device, check_mode, check_seconds, check_submit
from supervisor.config import Config
from supervisor.engine.commands import CancelJob, Follow, QueuedJob, QueuedSwitch, Reload, Shutdown, Unload
from supervisor.engine.loop import Engine
from supervisor.events import DEFAULT_BUFFER, EventStream, Subscription
from supervisor.futures import JobFuture, gather
from supervisor.quota import Limits, QueueQuota
from supervisor.status import Status, SwitchResult
from supervisor.surface import ChunkSink, SupervisorAPI

_RELOAD_SWAP_S = 10.0  # the most reload() waits for the loop to take the new configuration
log = logging.getLogger("gpuvisor")


def _stop_stream(engine: Engine, future: JobFuture, wait: bool) -> bool:
    """Ask the loop to stop ``future``'s stream while it runs (see
    ``JobFuture.cancel``); with ``wait``, its answer."""
    if wait and engine.on_loop_thread():
        raise RuntimeError(
            "cancel() of a running stream from a chunk sink or a Future callback would wait on itself; "
            "use give_up(), which does not wait"
        )
    command = CancelJob(future, Future() if wait else None)
    try:
        engine.post(command)
    except RuntimeError:  # a Supervisor from before a fork: not ours to stop
        return False
    if command.future is None:
        return False
    try:
        return bool(command.future.result())
    except GpuvisorError:  # the supervisor has stopped: the job has its outcome already
        return future.cancelled()


class Supervisor(SupervisorAPI):
    """Runs jobs in a worker process that owns the GPU; see the README's tour.

    Thread-safe. ``config`` is a path to a TOML file, a ``Config``, or None
    for the built-in default. ``mode``, when given, is loaded by ``start()``.
    """

    def __init__(self, config: str | Path | Config | None = None, *, mode: str | None = None):
        loaded = config if isinstance(config, Config) else config_mod.load(config)
        self._engine = Engine(loaded)
        initial = mode or loaded.default_mode or None
        if initial is not None and loaded.mode(initial) is None:
            raise UnknownMode(self._unknown_mode_message(initial))
        self._initial_mode = initial
        self._ids = itertools.count(1)
        self._start_lock = threading.Lock()
        self._started = False
        self._closed = False
        # Jobs (and switches) accepted and not yet ended, in all and per
        # client; each gives its share back in a done callback, so the count
        # is exact whatever way it ends.
        client_jobs, client_bytes = self.config.client_share()
        self._quota = QueueQuota(Limits(self.config.max_queue, self.config.max_queue_bytes, client_jobs, client_bytes))

    # -------------------------------------------------------------- lifecycle

    def start(self) -> Supervisor:
        """Start the loop thread (and the initial mode, without waiting for
        it). Idempotent; ``submit`` and ``switch_mode`` call it for you."""
        with self._start_lock:
            if self._closed:
                raise ShuttingDown("this supervisor was shut down; create a new one")
            if not self._started:
                self._engine.start()
                self._started = True
                at_exit.keep(self._engine)
                # Dropped without shutdown(): stop the worker rather than leak it.
                weakref.finalize(self, at_exit.post_stop, self._engine).atexit = False
                if self._initial_mode is not None:
                    self._engine.post(QueuedSwitch(self._initial_mode, Future()))
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop, and return once the worker is reaped.

        ``drain=True``: new work gets ``ShuttingDown``, queued work runs in
        order, then the worker gets DRAIN and exits 0. ``timeout`` bounds that
        drain; what has not run by then gets ``JobCancelled``.
        ``drain=False``: queued work and the job in flight get ``JobCancelled``
        and the worker is stopped at once."""
        timeout = check_seconds("timeout", timeout)
        if self._engine.on_loop_thread():
            raise RuntimeError(
                "shutdown() called from a Future callback would wait on itself; call it from another thread"
            )
        with self._start_lock:
            self._closed = True
            if not self._started:
                return
        command = Shutdown(drain, timeout)
        self._engine.post(command)
        command.future.result()
        self._engine.join(timeout=None)
        at_exit.forget(self._engine)

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown(drain=True)

    # -------------------------------------------------------------- work

    def submit_for(
        self,
        client: str,
        task: str,
        payload: Any = None,
        *,
        mode: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        on_chunk: ChunkSink | None = None,
        give_up_after: float | None = None,
        packed: bool = False,
    ) -> JobFuture:
        """``submit()`` on behalf of ``client``, one of many callers a front
        door serves (a ZeroMQ connection, an HTTP token): the job counts
        against that client's share of the queue (``max_queue_per_client``,
        ``max_queue_bytes_per_client``), so one client cannot fill the
        queue for the others. ``payload`` may be a ``PackedPayload``: a
        client's msgpack forwarded to the worker without being decoded
        here. ``timeout`` is the operator's (past it the worker is killed);
        ``give_up_after`` the client's own, shorter: past it the client gets
        ``JobTimeout`` and the worker finishes the job, its answer dropped,
        so a client's timeout never costs the others a worker. ``packed``:
        the result and chunks come as ``PackedPayload``s, the msgpack the
        worker sent, for a door that forwards them undecoded (what a caller's
        job returns is then never built into objects in this process)."""
        if not isinstance(client, str) or not client:
            raise TypeError(f"client must be a non-empty str, got {client!r}")
        timeout = check_submit(task, mode, timeout, retries, False, on_chunk)
        give_up = check_seconds("give_up_after", give_up_after)
        return self._queue_job(task, payload, mode, timeout, retries, on_chunk, client, give_up, packed)

    def _queue_job(
        self,
        task: str,
        payload: Any,
        mode: str | None,
        timeout: float | None,
        retries: int,
        on_chunk: ChunkSink | None,
        client: str | None = None,
        give_up: float | None = None,
        packed: bool = False,
    ) -> JobFuture:
        """``submit`` (and ``submit_for``) after the checks of the arguments.
        The payload is encoded here, in the caller's thread, so one msgpack
        cannot carry is the caller's ``TypeError`` at once."""
        job_id = next(self._ids)
        frames = encode_job(job_id, task, payload, on_chunk is not None)  # TypeError / ProtocolError here
        # A stream can be stopped while it runs; the stopper holds the engine, not the Supervisor.
        future = JobFuture(on_chunk, functools.partial(_stop_stream, self._engine) if on_chunk is not None else None)
        if not self._open(future, mode):
            return future
        try:
            # Given back exactly once: by the loop just before it settles the
            # job (so a caller woken by the result finds it free), or on
            # cancel(). Neither holds a reference to the Supervisor.
            future.hold_slot(self._quota.take(client, sum(nbytes(f) for f in frames)))
        except (QueueFull, RequestTooLarge) as exc:
            future.set_exception(exc)
            return future
        self._engine.post(
            QueuedJob(
                job_id, task, frames, mode, timeout, future, retries, on_chunk=on_chunk, give_up=give_up, packed=packed
            )
        )
        return future

    def switch_mode(self, mode: str, *, device: str | None = None) -> Future[SwitchResult]:
        """Make ``mode`` loaded, after every job queued before this call. The
        Future's result is ``{"mode", "status": "already_loaded", "pid"}``
        when it already is (the worker is untouched), else ``{"mode",
        "status": "loaded", "previous", "seconds", "load_seconds", "pid"}``
        and the reclaim figures. With several devices, ``device`` names the
        one to switch; None: a device that holds ``mode`` (a no-op), else
        one the mode may use, the longest free (the jobs' own placement
        would choose it too)."""
        check_mode(mode, optional=False)
        check_device(device)
        future: Future = Future()
        if self._open(future, mode, device) and self._hold_place(future):
            self._engine.post(QueuedSwitch(mode, future, device=device))
        return future

    def restart(self, mode: str | None = None, *, device: str | None = None) -> Future[SwitchResult]:
        """Replace a worker with a fresh one, in ``mode`` or the mode in force
        on its device, after every job queued before this call; also clears
        that device's ``failed`` state. With several devices, ``device``
        names it; None: a failed device first, else one holding ``mode``.
        Result: ``{"mode", "status": "restarted", "previous", "seconds",
        "load_seconds", "pid"}``."""
        check_mode(mode, optional=True)
        check_device(device)
        future: Future = Future()
        if self._open(future, mode, device) and self._hold_place(future):
            self._engine.post(QueuedSwitch(mode, future, restart=True, device=device))
        return future

    def unload(self, device: str | None = None) -> Future[dict[str, Any]]:
        """Free ``device`` (None: every device) now, the way ``idle_unload_s``
        does after a while: its worker is stopped once the jobs handed to it
        are done, and its memory comes back. The mode stays in force and jobs
        stay queued: the next job that needs the mode loads it again. Result:
        ``{"unloaded": [{"device", "mode", "pid"}, ...]}``, once those workers
        are gone; a device that held nothing, or was switching, is not in it."""
        check_device(device)
        future: Future = Future()
        if not self._open(future, None, device):
            return future
        parts: list[Future] = []
        for name in [device] if device is not None else self._engine.device_names:
            command = Unload(name)
            parts.append(command.future)
            self._engine.post(command)
        gather(parts, future, lambda results: {"unloaded": [r for r in results if r is not None]})
        return future

    def _open(self, future: Future, mode: str | None, device: str | None = None) -> bool:
        """Whether this supervisor takes a call that names ``mode`` and
        ``device``, starting it on first use; if not, ``future`` fails with
        why: ``UnknownMode``, ``ShuttingDown`` or ``WrongDevice``. These are
        the configuration's answers, not the arguments' (a client learns
        them from the daemon), so they come through the Future."""
        if mode is not None and self.config.mode(mode) is None:
            future.set_exception(UnknownMode(self._unknown_mode_message(mode)))
            return False
        if not self._running_or_fail(future):
            return False
        wrong = self._wrong_device(device, mode)
        if wrong is not None:
            future.set_exception(wrong)
            return False
        return True

    def _hold_place(self, future: Future) -> bool:
        """A switch or restart waits in the queue like a job: it holds a
        place under ``max_queue`` until it ends; with none left, ``future``
        fails with ``QueueFull``."""
        try:
            release = self._quota.take(None, 0)
        except QueueFull as exc:
            future.set_exception(exc)
            return False
        future.add_done_callback(lambda _: release())
        return True

    def _wrong_device(self, device: str | None, mode: str | None) -> WrongDevice | None:
        """A device this supervisor does not drive, or one ``mode``'s
        ``devices`` leaves out; the names are known once started."""
        if device is None:
            return None
        names = self._engine.device_names
        if device not in names:
            return WrongDevice(f"unknown device {device!r}; this supervisor drives {', '.join(names)}")
        spec = self.config.mode(mode) if mode is not None else None
        if spec is not None and not spec.allows(device):
            return WrongDevice(f"mode {mode!r} may not run on {device!r}: its devices are {', '.join(spec.devices)}")
        return None

    def reload(self, config: str | Path | Config | None = None) -> Future:
        """Swap in a new mode table and settings (a daemon does this on SIGHUP).
        A bad file raises ``ConfigError`` here and changes nothing. The loaded
        worker keeps running as it was loaded; a mode's new entry applies the
        next time it loads (``restart()`` does that now). ``max_queue`` keeps
        its value until the supervisor is restarted."""
        new = config if isinstance(config, Config) else config_mod.load(config)
        if new.max_queue != self.config.max_queue:
            log.warning("max_queue changes take effect when the supervisor restarts; keeping %d", self.config.max_queue)
        future: Future = Future()
        if not self._running_or_fail(future):
            return future
        command = Reload(new, future)
        self._engine.post(command)
        # The loop swaps it in at its next turn (milliseconds): from then on
        # ``config`` and every submit see the new one. A loop that stops
        # first fails the future instead.
        deadline = time.monotonic() + _RELOAD_SWAP_S
        while not command.swapped.wait(0.05) and not future.done() and time.monotonic() < deadline:
            pass
        return future

    @property
    def config(self) -> Config:
        """The configuration in force: the loop's own (one holder), swapped by ``reload``."""
        return self._engine.config

    def modes(self) -> dict[str, dict[str, Any]]:
        """Each configured mode: ``loader``, ``loaded`` (now) and ``tasks``
        (the task names its worker reported when it last loaded; None until
        it has loaded once)."""
        return self._engine.modes()

    def status(self) -> Status:
        """A snapshot, never blocking: ``state``, ``mode``, ``worker_state``,
        ``worker_pid``, ``generation``, ``queued``, ``in_flight``,
        ``restarts``, ``jobs_done``, ``switching_to``, ``last_error``,
        ``failed_reason`` (set while ``state`` is ``"failed"``), and the
        memory and model fields docs/protocol.md lists under ``status``
        (``gpu``, ``worker_vram_bytes``, ``worker_rss_bytes``, ``window``,
        ``standby_pid`` ...): the same map the daemon answers with."""
        return self._engine.status

    def metrics(self) -> str:
        """Counters, histograms and the status's gauges in the Prometheus text
        format (docs/operations.md lists them): what ``GET /metrics`` and
        ``gpuvisor metrics`` serve."""
        return self._engine.metrics.exposition().decode()

    def events(self, *, buffer: int = DEFAULT_BUFFER) -> EventStream:
        """Follow what the supervisor does: switch phases, workers started
        and ended, a drain's progress (docs/protocol.md lists the events).
        The stream begins with where things stand (``following``, then the
        phase of each switch under way) and ends when the supervisor stops.
        A reader that falls ``buffer`` events behind loses the oldest and
        is told how many (a ``dropped`` event): the supervisor never waits
        for a reader."""
        sub = Subscription(buffer)
        if not self._started:
            refused: Future = Future()
            if not self._running_or_fail(refused):  # shut down before it started: the stream ends with why
                sub.close()
                return EventStream(sub, ended=refused)
        # Posted even while it stops (a drain is worth following); once it has stopped, the stream ends at once.
        self._engine.post(Follow(sub))
        return EventStream(sub)

    def healthy(self, max_age: float) -> bool:
        """The core loop is alive and has turned within ``max_age`` seconds
        (it turns at least once a second when idle). For watchdogs."""
        return self._engine.alive and time.monotonic() - self._engine.published_at <= max(max_age, 2.0)

    def _running_or_fail(self, future: Future) -> bool:
        """Start on first use; after shutdown, fail ``future`` instead."""
        if self._started and not self._closed:  # the common case, without the lock
            return True
        try:
            self.start()
            return True
        except ShuttingDown as exc:
            future.set_exception(exc)
            return False

    def _unknown_mode_message(self, mode: str) -> str:
        return f"unknown mode {mode!r}; {self.config.source} has {', '.join(sorted(self.config.modes))}"
