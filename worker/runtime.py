"""The worker's two threads, each with a socket of its own.

::

    supervisor ROUTER <==tcp/ipc==> DEALER "g<gen>"  [main thread]       LOAD  -> loader, READY
                                                                          JOB   -> handler, RESULT (or CHUNKs,
                                                                                   a CANCEL looked for after each)
                                                                          BATCH -> handler once, RESULT per job
                                                                          DRAIN -> exit 0
                      <==tcp/ipc==  DEALER "h<gen>"  [heartbeat thread]  HEARTBEAT every interval,
                                                                          parent-pid check,
                                                                          g<gen>'s connection watched

The main thread owns the job socket and runs the loader and the handlers,
one job at a time, so a handler may use whatever needs the main thread and
a job crosses no thread inside the worker (handing each job from a socket
thread to a handler thread costs about 95 µs of CPU, measured). Heartbeats
go from a thread of their own on a socket of their own
(``worker.heartbeat``), so they keep coming while a handler runs for
minutes, and that thread also watches the job socket's connection: a
dropped connection must end the worker even while its main thread is busy.
ZeroMQ sockets are not thread-safe, so each socket has one owning thread
(the job socket's monitor is made by the main thread and handed over before
the heartbeat thread starts).

A streamed job can be stopped: after each chunk it sends, the main thread
looks at the job socket without blocking (a poll with a zero timeout: 1.6 µs
a chunk, measured) for a CANCEL naming that job, closes the generator (its
``finally`` blocks run) and answers ``job_cancelled``. What else it reads
meanwhile (the next JOB of a window) is kept, in order, for the main loop.
A job that does not stream is never interrupted: only killing the worker
could stop it.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import os
import sys
import time
import traceback
from typing import Any

import zmq

from protocol import (
    Chunk,
    Drain,
    Failure,
    GpuvisorError,
    Hello,
    Job,
    JobBatch,
    JobCancelled,
    JobFailed,
    Kind,
    Load,
    LoadFailed,
    ModeLoadError,
    OutOfMemory,
    ProtocolError,
    Ready,
    Result,
    UnknownTask,
    WorkerExit,
    decode_to_worker,
    encode,
)
from protocol.frames import read_all, recv_message
from protocol.messages import Cancel, job_ids_of
from protocol.packing import peek
from worker.batching import batch_limits
from worker.heartbeat import SEND_TIMEOUT_MS, HeartbeatThread, log_line, send_or_exit
from worker.loader import Handler, failure_text, heavy_imports, load_mode
from worker.memory import is_out_of_memory, torch_memory

_LINGER_MS = 5000
LOAD_FAILED_EXIT_CODE = WorkerExit.LOAD_FAILED


def _error_map(exc: BaseException, fallback: type[GpuvisorError], text: str | None = None) -> dict[str, Any]:
    """A handler's exception as a wire error. One the handler raised on purpose
    (a GpuvisorError) keeps its own code; running out of memory becomes
    ``OutOfMemory`` with torch's figures; anything else becomes ``fallback``.
    ``text``: the message, when it says more than the exception's own."""
    tb = "".join(traceback.format_exception(exc))
    text = text or f"{type(exc).__name__}: {exc}"
    if isinstance(exc, GpuvisorError):
        wire = exc.to_wire()
    elif is_out_of_memory(exc) and fallback is JobFailed:
        wire = OutOfMemory(text, memory=torch_memory()).to_wire()
    else:
        wire = fallback(text).to_wire()
    wire.setdefault("remote_type", type(exc).__name__)
    wire.setdefault("traceback", tb)
    return wire


class _Worker:
    def __init__(self, gen: int, sock: zmq.Socket, beat: HeartbeatThread):
        self.gen, self._sock, self._beat = gen, sock, beat
        self.mode: str | None = None
        self.handlers: dict[str, Handler] = {}
        # Messages read while a stream ran, for the main loop, in order.
        self._kept: collections.deque[list] = collections.deque()
        self._incoming = zmq.Poller()  # the job socket, polled without blocking after each chunk
        self._incoming.register(sock, zmq.POLLIN)

    def send(self, msg) -> None:
        send_or_exit(self._sock, encode(msg), self.gen)

    def recv(self):
        while True:
            # Arrays arrive as views of their frames.
            frames = self._kept.popleft() if self._kept else recv_message(self._sock)
            try:
                return decode_to_worker(frames)
            except ProtocolError as exc:
                log_line(self.gen, f"dropped a malformed message from the supervisor: {exc}")
                if self.mode is not None:  # a job we cannot read still gets its one answer
                    error = ProtocolError(f"the {peek(frames, 'k')} message could not be read: {exc.message}")
                    for job in job_ids_of(frames):
                        self.send(Failure(job, error.to_wire()))

    def load(self, msg: Load) -> bool:
        started = time.perf_counter()
        warmup_seconds = None
        try:
            self.handlers = load_mode(msg.loader, msg.args, msg.path or ())
            loaded = time.perf_counter()
            if msg.warmup is not None:
                self._warm_up(msg.warmup)
                warmup_seconds = time.perf_counter() - loaded
        except Exception as exc:  # noqa: BLE001 - any loader error fails the switch, with its traceback
            # The loader file's line goes into the message itself: the CLI and the log show the message.
            text = failure_text(msg.loader, exc)
            log_line(self.gen, f"loading mode {msg.mode!r} failed: {text}")
            self.send(LoadFailed(msg.mode, _error_map(exc, ModeLoadError, text)))
            return False
        self.mode = msg.mode
        load_seconds = (loaded - started) if warmup_seconds is not None else time.perf_counter() - started
        batch = {task: limits for task, handler in self.handlers.items() if (limits := batch_limits(handler))}
        self.send(
            Ready(
                msg.mode,
                load_seconds,
                sorted(self.handlers),
                warmup_seconds,
                torch_memory(),
                heavy_imports(),
                batch or None,
            )
        )
        return True

    def _warm_up(self, warmup: dict) -> None:
        """Run the mode's warm-up job once, so the first real job does not pay
        for lazy initialisation (CUDA kernels, tokenizer caches, autotuning)."""
        task = warmup.get("task")
        handler = self.handlers.get(task) if isinstance(task, str) else None
        if handler is None:
            raise ValueError(
                f"warm-up task {task!r} is not one of this mode's tasks ({', '.join(sorted(self.handlers))})"
            )
        payload = warmup.get("payload")
        try:
            _exhaust(handler([payload]) if batch_limits(handler) else handler(payload), lambda chunk: None)
        except Exception as exc:
            raise RuntimeError(f"warm-up job {task!r} failed: {type(exc).__name__}: {exc}") from exc

    def _handler(self, job: Job) -> Handler | None:
        """The job's handler, or None once the job has its UnknownTask failure."""
        handler = self.handlers.get(job.task)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            error = UnknownTask(f"mode {self.mode!r} has no task {job.task!r} (it has: {known})").to_wire()
            self.send(Failure(job.job, error))
        return handler

    def run_job(self, msg: Job) -> None:
        handler = self._handler(msg)
        if handler is None:
            return
        if batch_limits(handler) is not None:  # a batch of one; a stream request gets the result alone
            self._run_batch(handler, msg.task, [msg])
            return
        seq, stopped = 0, False

        def chunk(value: Any) -> None:
            nonlocal seq, stopped
            if msg.stream:
                seq += 1
                # Copied (copy=True): the generator resumes as soon as this
                # returns and may refill the very buffer it just yielded.
                frames = self._encode_outcome(Chunk(msg.job, seq, value), msg.task)
                send_or_exit(self._sock, frames, self.gen, copy=True)
                if self._incoming.poll(0) and self._cancel_asked(msg.job):
                    stopped = True
                    raise _Cancelled

        try:
            value = _exhaust(handler(msg.payload), chunk)
        except _Unsendable as exc:
            self.send(Failure(msg.job, exc.error))
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is the job's outcome
            if stopped:  # even if the generator's own clean-up raised on the way out
                error = JobCancelled(
                    f"job {msg.job} ({msg.task!r}) was stopped after chunk {seq}: its caller cancelled it"
                )
                self.send(Failure(msg.job, error.to_wire()))
            else:
                self.send(Failure(msg.job, _error_map(exc, JobFailed)))
            return
        self._answer(msg, value)

    def _cancel_asked(self, job: int) -> bool:
        """Read what waits on the job socket: True if it holds a CANCEL for
        ``job``. A CANCEL for another job (one already answered) is ignored;
        anything else is kept for the main loop, undecoded (a message that
        cannot be read is answered there, in its turn)."""
        asked = False
        for frames in read_all(self._sock):
            try:
                msg = decode_to_worker(frames) if len(frames) == 1 and peek(frames, "k") == Kind.CANCEL else None
            except ProtocolError:
                msg = None
            if isinstance(msg, Cancel):
                asked = asked or msg.job == job
            else:
                self._kept.append(frames)
        return asked

    def run_batch(self, msg: JobBatch) -> None:
        """One call of a batch handler for the whole batch. A handler that
        takes one payload (or a task the mode lacks) gets the jobs one by
        one, in order, as if they had come as JOB messages."""
        handler = self.handlers.get(msg.task)
        if handler is None or batch_limits(handler) is None:
            for job in msg.jobs:
                self.run_job(job)
            return
        self._run_batch(handler, msg.task, msg.jobs)

    def _run_batch(self, handler: Handler, task: str, jobs: list[Job]) -> None:
        """Each job answered on its own, in order. The handler's error (or a
        return value that is not one result per payload) is every job's
        failure; a result that cannot be sent fails its own job alone."""
        error = None
        try:
            values = handler([job.payload for job in jobs])
            if not isinstance(values, list) or len(values) != len(jobs):
                got = f"a list of {len(values)}" if isinstance(values, list) else f"a {type(values).__name__}"
                error = JobFailed(
                    f"batch handler {task!r} returned {got}; it must return a list of {len(jobs)} results, "
                    "one per payload, in order"
                ).to_wire()
        except Exception as exc:  # noqa: BLE001 - any handler error is the outcome of every job of the batch
            error = _error_map(exc, JobFailed)
        if error is not None:
            for job in jobs:
                self.send(Failure(job.job, error))
            return
        for job, value in zip(jobs, values, strict=True):
            self._answer(job, value)

    def _answer(self, job: Job, value: Any) -> None:
        try:
            frames = self._encode_outcome(Result(job.job, value), job.task)
        except _Unsendable as exc:
            self.send(Failure(job.job, exc.error))
            return
        send_or_exit(self._sock, frames, self.gen)

    @staticmethod
    def _encode_outcome(msg: Result | Chunk, task: str) -> list:
        try:
            return encode(msg)
        except (TypeError, ProtocolError) as exc:
            what = "a chunk" if isinstance(msg, Chunk) else "a result"
            raise _Unsendable(
                JobFailed(
                    f"task {task!r} returned {what} that cannot be sent: {exc}", remote_type=type(exc).__name__
                ).to_wire()
            ) from None

    def serve(self) -> int:
        """LOAD first, then jobs until DRAIN. Returns the exit code."""
        while self.mode is None:
            msg = self.recv()
            if isinstance(msg, Load):
                if not self.load(msg):
                    return LOAD_FAILED_EXIT_CODE
            else:
                log_line(self.gen, f"ignored {_kind(msg)} before LOAD")
        while True:
            msg = self.recv()
            if isinstance(msg, Job):
                self.run_job(msg)
            elif isinstance(msg, JobBatch):
                self.run_batch(msg)
            elif isinstance(msg, Drain):
                return 0
            elif isinstance(msg, Cancel):
                pass  # its job has been answered (or never came): nothing is running to stop
            else:
                log_line(self.gen, f"ignored {_kind(msg)}: mode {self.mode!r} is already loaded")


def _kind(msg: Any) -> str:
    return "batch" if isinstance(msg, JobBatch) else msg.kind.value


class _Cancelled(Exception):
    """The supervisor asked to stop the stream that runs: raised from the
    chunk callback, so that ``_exhaust`` closes the generator."""


class _Unsendable(Exception):
    """A handler's output that msgpack cannot carry: the job fails with this
    wire error, and a generator handler stops there."""

    def __init__(self, error: dict):
        super().__init__(error.get("message"))
        self.error = error


def _exhaust(value: Any, on_chunk) -> Any:
    """A plain handler's value is its result. A generator handler's chunks go
    to ``on_chunk`` as they come and its ``return`` value is the result; the
    generator is closed on the way out, so its ``finally`` blocks run."""
    if not inspect.isgenerator(value):
        return value
    with contextlib.closing(value):
        while True:
            try:
                item = next(value)
            except StopIteration as stop:
                return stop.value
            on_chunk(item)


def run(endpoint: str, gen: int, parent_pid: int, heartbeat_interval: float) -> int:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, f"g{gen}".encode())
    sock.setsockopt(zmq.LINGER, _LINGER_MS)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED)
    sock.connect(endpoint)
    beat = HeartbeatThread(ctx, endpoint, gen, parent_pid, heartbeat_interval, monitor)
    beat.start()
    code = 1
    try:
        worker = _Worker(gen, sock, beat)
        worker.send(Hello(os.getpid(), gen))
        code = worker.serve()
    finally:
        sock.disable_monitor()  # the heartbeat thread hears MONITOR_STOPPED and ends
        beat.join(timeout=SEND_TIMEOUT_MS / 1000 + 1)
        sock.close()  # lingers, so the last RESULT and LOAD_FAILED get out
        if beat.is_alive():  # stuck: ctx.term() would block on its socket
            os._exit(code)
        ctx.term()
    if code == LOAD_FAILED_EXIT_CODE:
        # A failed load can leave half-built models and library threads whose
        # teardown takes seconds (torch's); the supervisor waits on this exit
        # before it tells the caller, so LOAD_FAILED is sent and this is it.
        sys.stderr.flush()
        os._exit(code)
    return code
