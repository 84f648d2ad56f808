"""The worker's two threads.

::

    supervisor ROUTER <==tcp/ipc==> DEALER  [I/O thread]  PAIR <==inproc==> PAIR  [main thread]
                                    (routing id "g<gen>")  heartbeats,            LOAD -> loader
                                                           parent-pid check       JOB  -> handler
                                                                                  DRAIN -> exit 0

The main thread runs the loader and the handlers, one job at a time, so a
handler may use whatever needs the main thread. The I/O thread owns the
DEALER socket: it moves frames both ways, sends a heartbeat every interval
even while a job runs, and kills the process if the supervisor is gone. ZeroMQ
sockets are not thread-safe, so each socket has exactly one owning thread.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import sys
import threading
import time
import traceback
from typing import Any

import zmq

from protocol import (
    Chunk,
    Drain,
    Failure,
    GpuvisorError,
    Heartbeat,
    Hello,
    Job,
    JobFailed,
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
from protocol.frames import read_all, recv_message, small
from protocol.messages import peek
from worker.lifeline import exit_if_orphaned
from worker.loader import Handler, load_mode
from worker.memory import is_out_of_memory, torch_memory

_CLOSE = b""  # main -> I/O thread: flush and close. Never valid msgpack, so never a message.
_LINGER_MS = 5000
# A DEALER blocks a send for as long as it has no peer. Past this, the
# supervisor is unreachable: waiting longer would also stop the heartbeat
# thread from checking whether the supervisor is alive at all.
_SEND_TIMEOUT_MS = 3000
LOAD_FAILED_EXIT_CODE = WorkerExit.LOAD_FAILED


def _log(gen: int, text: str) -> None:
    """One line to stderr, which is a pipe to the supervisor: when the
    supervisor is gone the write fails, and a log line must never be what
    stops the worker from noticing that."""
    try:
        print(f"gpuvisor-worker[gen {gen} pid {os.getpid()}]: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _IoThread(threading.Thread):
    """Owns the DEALER socket; see the module docstring."""

    def __init__(self, ctx: zmq.Context, endpoint: str, gen: int, parent_pid: int, interval: float, pipe: str):
        super().__init__(name="gpuvisor-worker-io", daemon=True)
        self._ctx, self._endpoint, self._gen = ctx, endpoint, gen
        self._parent_pid, self._interval, self._pipe_addr = parent_pid, interval, pipe
        self.busy = False  # written by the main thread only; read here for heartbeats

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - without this thread the worker is deaf and blind
            _log(self._gen, f"I/O thread failed ({type(exc).__name__}: {exc}); exiting")
            os._exit(WorkerExit.DISCONNECTED)

    def _serve(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        pipe = self._ctx.socket(zmq.PAIR)
        monitor = None
        try:
            dealer.setsockopt(zmq.ROUTING_ID, f"g{self._gen}".encode())
            dealer.setsockopt(zmq.LINGER, _LINGER_MS)
            dealer.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
            # A dropped connection is fatal, never silently healed by a
            # reconnect: the supervisor drops it when we send a frame over its
            # limit, and whatever we were answering would be lost with it.
            monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            dealer.connect(self._endpoint)
            pipe.setsockopt(zmq.LINGER, 0)
            pipe.connect(self._pipe_addr)
            poller = zmq.Poller()
            poller.register(dealer, zmq.POLLIN)
            poller.register(pipe, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            next_beat = 0.0
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    exit_if_orphaned(self._parent_pid)
                    self._send(dealer, encode(Heartbeat(self.busy, torch_memory())))
                    next_beat = now + self._interval
                events = dict(poller.poll(math.ceil(max(0.0, next_beat - time.monotonic()) * 1000)))
                # Everything waiting, not one message per poll: a window of
                # jobs (and a burst of results) crosses in one turn.
                if dealer in events:
                    for frames in read_all(dealer):  # array frames pass through, never copied
                        pipe.send_multipart(frames, copy=small(frames))
                if pipe in events:
                    for frames in read_all(pipe):
                        if frames == [_CLOSE]:
                            return
                        self._send(dealer, frames)
                if monitor in events:
                    monitor.recv_multipart()
                    self._lost("the supervisor dropped our connection")
        finally:
            if monitor is not None:
                dealer.disable_monitor()
                monitor.close(linger=0)
            pipe.close()
            dealer.close()  # lingers, so the last RESULT and LOAD_FAILED get out

    def _send(self, dealer: zmq.Socket, frames: list) -> None:
        try:
            dealer.send_multipart(frames, copy=small(frames))
        except zmq.Again:
            self._lost(f"could not send to the supervisor for {_SEND_TIMEOUT_MS / 1000:g}s")

    def _lost(self, why: str) -> None:
        _log(self._gen, f"{why}; exiting")
        os._exit(WorkerExit.DISCONNECTED)


def _error_map(exc: BaseException, fallback: type[GpuvisorError]) -> dict[str, Any]:
    """A handler's exception as a wire error. One the handler raised on purpose
    (a GpuvisorError) keeps its own code; running out of memory becomes
    ``OutOfMemory`` with torch's figures; anything else becomes ``fallback``."""
    tb = "".join(traceback.format_exception(exc))
    if isinstance(exc, GpuvisorError):
        wire = exc.to_wire()
    elif is_out_of_memory(exc) and fallback is JobFailed:
        wire = OutOfMemory(f"{type(exc).__name__}: {exc}", memory=torch_memory()).to_wire()
    else:
        wire = fallback(f"{type(exc).__name__}: {exc}").to_wire()
    wire.setdefault("remote_type", type(exc).__name__)
    wire.setdefault("traceback", tb)
    return wire


class _Worker:
    def __init__(self, gen: int, pipe: zmq.Socket, io: _IoThread):
        self.gen, self._pipe, self._io = gen, pipe, io
        self.mode: str | None = None
        self.handlers: dict[str, Handler] = {}

    def send(self, msg) -> None:
        frames = encode(msg)
        self._pipe.send_multipart(frames, copy=small(frames))

    def recv(self):
        while True:
            frames = recv_message(self._pipe)  # arrays arrive as views of their frames
            try:
                return decode_to_worker(frames)
            except ProtocolError as exc:
                _log(self.gen, f"dropped a malformed message from the supervisor: {exc}")
                job = peek(frames, "job") if peek(frames, "k") == "job" and self.mode is not None else None
                if isinstance(job, int):  # a job we cannot read still gets its one answer
                    self.send(
                        Failure(job, ProtocolError(f"the job message could not be read: {exc.message}").to_wire())
                    )

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
            _log(self.gen, f"loading mode {msg.mode!r} failed: {type(exc).__name__}: {exc}")
            self.send(LoadFailed(msg.mode, _error_map(exc, ModeLoadError)))
            return False
        self.mode = msg.mode
        load_seconds = (loaded - started) if warmup_seconds is not None else time.perf_counter() - started
        self.send(
            Ready(msg.mode, load_seconds, sorted(self.handlers), warmup_seconds, torch_memory(), _heavy_imports())
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
        try:
            _exhaust(handler(warmup.get("payload")), lambda chunk: None)
        except Exception as exc:
            raise RuntimeError(f"warm-up job {task!r} failed: {type(exc).__name__}: {exc}") from exc

    def run_job(self, msg: Job) -> None:
        handler = self.handlers.get(msg.task)
        if handler is None:
            known = ", ".join(sorted(self.handlers)) or "none"
            error = UnknownTask(f"mode {self.mode!r} has no task {msg.task!r} (it has: {known})").to_wire()
            self.send(Failure(msg.job, error))
            return
        seq = 0

        def chunk(value: Any) -> None:
            nonlocal seq
            if msg.stream:
                seq += 1
                # Copied (copy=True): the generator resumes as soon as this
                # returns and may refill the very buffer it just yielded.
                self._pipe.send_multipart(self._encode_outcome(Chunk(msg.job, seq, value), msg.task), copy=True)

        self._io.busy = True
        try:
            value = _exhaust(handler(msg.payload), chunk)
        except _Unsendable as exc:
            self.send(Failure(msg.job, exc.error))
            return
        except Exception as exc:  # noqa: BLE001 - any handler error is the job's outcome
            self.send(Failure(msg.job, _error_map(exc, JobFailed)))
            return
        finally:
            self._io.busy = False
        try:
            frames = self._encode_outcome(Result(msg.job, value), msg.task)
        except _Unsendable as exc:
            self.send(Failure(msg.job, exc.error))
            return
        self._pipe.send_multipart(frames, copy=small(frames))

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
                _log(self.gen, f"ignored {msg.kind.value} before LOAD")
        while True:
            msg = self.recv()
            if isinstance(msg, Job):
                self.run_job(msg)
            elif isinstance(msg, Drain):
                return 0
            else:
                _log(self.gen, f"ignored {msg.kind.value}: mode {self.mode!r} is already loaded")


# Libraries slow enough to import that a warm standby should have them ready,
# with every submodule the mode pulled in (``import transformers`` alone is
# lazy: the model classes are most of the cost). Third-party only: importing
# them touches no GPU, which a loader's own module might do at import time.
_PRELOADABLE = frozenset({"torch", "transformers", "tokenizers", "safetensors", "huggingface_hub",
                          "sentence_transformers", "accelerate", "diffusers", "vllm", "onnxruntime", "scipy",
                          "sklearn", "numpy"})  # fmt: skip


def _heavy_imports() -> list[str]:
    """In import order (sys.modules keeps it), so a standby can repeat it."""
    return [name for name in list(sys.modules) if name.partition(".")[0] in _PRELOADABLE]


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
    pipe_addr = f"inproc://gpuvisor-worker-{gen}"
    pipe = ctx.socket(zmq.PAIR)
    pipe.setsockopt(zmq.LINGER, 0)
    pipe.bind(pipe_addr)
    io = _IoThread(ctx, endpoint, gen, parent_pid, heartbeat_interval, pipe_addr)
    io.start()
    code = 1
    try:
        worker = _Worker(gen, pipe, io)
        worker.send(Hello(os.getpid(), gen))
        code = worker.serve()
    finally:
        pipe.send(_CLOSE)
        io.join(timeout=_LINGER_MS / 1000 + 1)
        pipe.close()
        if io.is_alive():  # could not flush in time; ctx.term() would block on its socket
            os._exit(code)
        ctx.term()
    if code == LOAD_FAILED_EXIT_CODE:
        # A failed load can leave half-built models and library threads whose
        # teardown takes seconds (torch's); the supervisor waits on this exit
        # before it tells the caller, so LOAD_FAILED is sent and this is it.
        sys.stderr.flush()
        os._exit(code)
    return code
