"""A world for the engine with no process, no socket and no real time: the
engine stepped by hand, turn by turn, as vLLM's tests step ``EngineCore``.

``FakeWorld`` builds an ``Engine`` against a fake worker link (it records
what the engine sends to each worker and delivers what a test makes a
worker say, encoded and decoded by the real protocol), fake processes (a
pid, alive until a test or a signal ends them, no pidfd) and a fake clock.
Every helper acts, then turns the loop once, so the engine has seen it::

    with FakeWorld({"m": "fake:m", "n": "fake:n"}) as world:
        switched = world.switch("m")          # the engine spawns a worker
        world.worker_says_ready()             # HELLO, LOAD, READY
        assert switched.result(0)["status"] == "loaded"
        job = world.submit("echo", 1)
        world.finish_job(value=1)             # RESULT for the job it runs
        assert job.result(0) == 1
        world.kill_worker()                   # SIGKILL: reaped this turn
        world.advance(5.0)                    # deadlines fire at the next step()

Devices are named as in the status (``"cpu"``, or ``"cpu:0"``... with
``devices=["cpu", "cpu"]``), or given by their index. Settings go to the
config's ``[supervisor]`` table; the world always sets a ``worker_command``
(so no loader is looked for on disk) and no warm standby.
"""

from __future__ import annotations

import collections
import itertools
import signal
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from protocol import Chunk, Failure, Heartbeat, Hello, Job, LoadFailed, Ready, Result, decode_to_worker, encode
from protocol.messages import JobBatch, encode_job
from supervisor.config import Config, parse
from supervisor.engine.commands import CancelJob, Command, QueuedJob, QueuedSwitch, Reload, Shutdown, Unload
from supervisor.engine.device_state import LAST_WORDS_MAX_S
from supervisor.engine.link import Received, received
from supervisor.engine.loop import Engine
from supervisor.futures import JobFuture
from tests.helpers.config import config_text

__all__ = ["LAST_WORDS_MAX_S", "FakeClock", "FakeLink", "FakeProcess", "FakeProcesses", "FakeWorld"]
# LAST_WORDS_MAX_S: how long the engine reads a dead worker's socket for its last words at most;
# advance past it and the death is concluded.

FIRST_FAKE_PID = 7_000_000  # above any pid_max Linux allows by default: never a real process's


class FakeClock:
    """The engine's time: it moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeProcess:
    """A worker process as the engine sees one: a pid, an exit status once
    it ends, the signals it was sent. ``deaf``: it ignores SIGTERM."""

    def __init__(self, pid: int, argv: list[str], env: Mapping[str, str]) -> None:
        self.pid = pid
        self.argv = argv
        self.env = dict(env)
        self.gen = int(argv[argv.index("--gen") + 1])
        self.returncode: int | None = None
        self.signals: list[signal.Signals] = []
        self.deaf = False
        self.stderr = None  # nothing to read: the engine keeps no tail

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def exit(self, code: int) -> None:
        """It ends with ``code`` (negative: killed by that signal)."""
        if self.returncode is None:
            self.returncode = code


class FakeProcesses:
    """``supervisor.engine.process.Processes`` without an OS: each start
    makes a ``FakeProcess``; SIGTERM and SIGKILL end it at once (SIGTERM
    not for a deaf one). ``refuse``: the next start raises it."""

    def __init__(self) -> None:
        self.started: list[FakeProcess] = []
        self.refuse: OSError | None = None
        self._pids = itertools.count(FIRST_FAKE_PID)

    def start(self, argv: list[str], device_env: dict[str, str]) -> Any:
        if self.refuse is not None:
            error, self.refuse = self.refuse, None
            raise error
        proc = FakeProcess(next(self._pids), argv, device_env)
        self.started.append(proc)
        return proc

    def signal(self, proc: Any, sig: signal.Signals) -> None:
        proc.signals.append(sig)
        if sig is signal.SIGKILL or (sig is signal.SIGTERM and not proc.deaf):
            proc.exit(-int(sig))

    def pidfd(self, proc: Any) -> int | None:
        return None  # the engine looks for its exit every turn

    def stop_and_reap(self, proc: Any, grace: float, *, kill_now: bool = False) -> int:
        proc.exit(-int(signal.SIGKILL))
        return proc.returncode

    def by_pid(self, pid: int | None) -> FakeProcess | None:
        return next((p for p in self.started if p.pid == pid), None)


class FakeLink:
    """The worker socket: what the engine sends is kept per worker identity
    (``g<gen>``), what a test delivers is decoded by the real decoder."""

    endpoint = "ipc:///fake-world/worker.sock"
    socket = None

    def __init__(self) -> None:
        self.sent: dict[bytes, list[list]] = collections.defaultdict(list)
        self.unreachable: set[bytes] = set()  # sends to these fail, as to a worker whose socket is gone
        self._waiting: collections.deque[tuple[bytes, list]] = collections.deque()

    def send(self, identity: bytes, frames: list) -> bool:
        if identity in self.unreachable:
            return False
        self.sent[identity].append([bytes(f) for f in frames])
        return True

    def deliver(self, identity: bytes, frames: list) -> None:
        self._waiting.append((identity, [bytes(f) for f in frames]))

    def receive(self, packed: Any = ()) -> Iterator[Received]:
        while self._waiting:
            identity, body = self._waiting.popleft()
            yield received(identity, body, packed)

    def messages(self, identity: bytes) -> list:
        """What the engine sent to ``identity``, decoded as a worker would."""
        return [decode_to_worker(frames) for frames in self.sent.get(identity, [])]

    def close(self) -> None:
        pass


Device = int | str


class FakeWorld:
    def __init__(self, modes: Mapping[str, Any] | None = None, **settings: Any) -> None:
        supervisor = {"worker_command": ["fake-worker"], "warm_standby": False, "devices": ["cpu"], **settings}
        self.config: Config = parse(config_text(modes or {"m": "fake:m", "n": "fake:n"}, supervisor=supervisor))
        self.clock = FakeClock()
        self.link = FakeLink()
        self.processes = FakeProcesses()
        self.engine = Engine(self.config, link=self.link, processes=self.processes, clock=self.clock)  # type: ignore[arg-type]
        self.engine.open()
        self._ids = itertools.count(1)
        self._answered: set[tuple[bytes, int]] = set()  # (worker, job) pairs a test answered
        self._closed = False

    def __enter__(self) -> FakeWorld:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """What the loop does as it ends: every outcome handed out."""
        if not self._closed:
            self._closed = True
            self.engine.close()

    # ------------------------------------------------------------ time

    def step(self, turns: int = 1) -> None:
        for _ in range(turns):
            self.engine.step()

    def advance(self, seconds: float) -> None:
        """The clock moves, then a turn: what fell due fires."""
        self.clock.advance(seconds)
        self.step()

    # ------------------------------------------------------------ callers

    def post(self, command: Command) -> None:
        self.engine.post(command)
        self.step()

    def submit(self, task: str, payload: Any = None, *, mode: str | None = None, timeout: float | None = None,
               retries: int = 0, on_chunk: Callable[[Any], None] | None = None,
               give_up: float | None = None) -> JobFuture:  # fmt: skip
        """A job, as ``Supervisor.submit`` queues it (without the queue's
        quota); ``on_chunk``: it streams."""
        job_id = next(self._ids)
        future = JobFuture(on_chunk, None)
        frames = encode_job(job_id, task, payload, on_chunk is not None)
        self.post(QueuedJob(job_id, task, frames, mode, timeout, future, retries, on_chunk=on_chunk,
                            give_up=give_up))  # fmt: skip
        return future

    def switch(self, mode: str, device: str | None = None) -> Future:
        future: Future = Future()
        self.post(QueuedSwitch(mode, future, device=device))
        return future

    def restart(self, mode: str | None = None, device: str | None = None) -> Future:
        future: Future = Future()
        self.post(QueuedSwitch(mode, future, restart=True, device=device))
        return future

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> Future:
        command = Shutdown(drain, timeout)
        self.post(command)
        return command.future

    def unload(self, device: str) -> Future:
        command = Unload(device)
        self.post(command)
        return command.future

    def cancel(self, target: JobFuture) -> Future:
        command = CancelJob(target, Future())
        self.post(command)
        assert command.future is not None
        return command.future

    def reload(self, modes: Mapping[str, Any] | None = None, **settings: Any) -> Future:
        supervisor = {"worker_command": ["fake-worker"], "warm_standby": False, "devices": ["cpu"], **settings}
        command = Reload(parse(config_text(modes or {"m": "fake:m", "n": "fake:n"}, supervisor=supervisor)))
        self.post(command)
        return command.future

    @property
    def status(self) -> dict[str, Any]:
        return self.engine.status  # type: ignore[return-value]

    # ------------------------------------------------------------ the workers

    def device(self, device: Device = 0) -> dict[str, Any]:
        """The device's entry in the last status."""
        devices = self.status["devices"]
        return devices[device] if isinstance(device, int) else next(d for d in devices if d["name"] == device)

    def worker(self, device: Device = 0) -> FakeProcess:
        """The process of the device's worker (in the last status)."""
        proc = self.processes.by_pid(self.device(device)["worker_pid"])
        assert proc is not None, f"no worker on device {device!r}: {self.device(device)}"
        return proc

    def identity(self, device: Device = 0) -> bytes:
        return f"g{self.worker(device).gen}".encode()

    def sent(self, device: Device = 0) -> list:
        """What the engine sent to the device's worker, decoded."""
        return self.link.messages(self.identity(device))

    def jobs_sent(self, device: Device = 0) -> list[int]:
        """The ids of the jobs the engine sent to the device's worker, in order."""
        ids: list[int] = []
        for msg in self.sent(device):
            if isinstance(msg, Job):
                ids.append(msg.job)
            elif isinstance(msg, JobBatch):
                ids.extend(job.job for job in msg.jobs)
        return ids

    def running(self, device: Device = 0) -> int:
        """The job the device's worker runs: the first sent that no test answered."""
        identity = self.identity(device)
        job = next((j for j in self.jobs_sent(device) if (identity, j) not in self._answered), None)
        assert job is not None, f"the worker on {device!r} runs no job; it was sent {self.sent(device)}"
        return job

    def says(self, message: Any, device: Device = 0, *, heartbeat: bool = False) -> None:
        """The device's worker sends ``message`` (a protocol message, or frames), then a turn."""
        gen = self.worker(device).gen
        frames = encode(message) if not isinstance(message, list) else message
        self.link.deliver(f"{'h' if heartbeat else 'g'}{gen}".encode(), frames)
        self.step()

    def worker_says_hello(self, device: Device = 0) -> None:
        proc = self.worker(device)
        self.says(Hello(proc.pid, proc.gen), device)

    def worker_says_ready(self, device: Device = 0, tasks: tuple[str, ...] = ("echo",),
                          batch: dict | None = None) -> None:  # fmt: skip
        """HELLO (if it has not said it), LOAD from the engine, then READY for the mode it was sent."""
        if self.device(device)["worker_state"] == "spawned":
            self.worker_says_hello(device)
        load = self.sent(device)[-1]
        self.says(Ready(load.mode, 0.01, list(tasks), batch=batch), device)

    def worker_fails_to_load(self, device: Device = 0, message: str = "no such model") -> None:
        if self.device(device)["worker_state"] == "spawned":
            self.worker_says_hello(device)
        load = self.sent(device)[-1]
        self.says(LoadFailed(load.mode, {"code": "mode_load_error", "message": message}), device)
        self.worker(device).exit(3)  # a worker whose load failed exits 3 by itself
        self.step()

    def finish_job(self, device: Device = 0, value: Any = None, job: int | None = None) -> None:
        """RESULT for ``job`` (default: the one it runs)."""
        job = self.running(device) if job is None else job
        self._answered.add((self.identity(device), job))
        self.says(Result(job, value), device)

    def fail_job(self, device: Device = 0, message: str = "it raised", code: str = "job_failed",
                 job: int | None = None) -> None:  # fmt: skip
        """FAILURE for ``job`` (default: the one it runs), with an error of ``code``
        (``out_of_memory`` makes the engine recycle the worker)."""
        job = self.running(device) if job is None else job
        self._answered.add((self.identity(device), job))
        self.says(Failure(job, {"code": code, "message": message}), device)

    def send_chunk(self, value: Any, seq: int, device: Device = 0, job: int | None = None) -> None:
        self.says(Chunk(self.running(device) if job is None else job, seq, value), device)

    def heartbeat(self, device: Device = 0, memory: dict | None = None) -> None:
        self.says(Heartbeat(memory), device, heartbeat=True)

    def kill_worker(self, device: Device = 0, sig: signal.Signals = signal.SIGKILL) -> None:
        """The worker dies by ``sig`` (an OOM killer, an operator), then a turn."""
        self.worker(device).exit(-int(sig))
        self.step()

    def exit_worker(self, device: Device = 0, code: int = 1) -> None:
        self.worker(device).exit(code)
        self.step()

    def outcome(self, future: Future) -> Any:
        """The result, or the error, of a Future that must be done by now."""
        assert future.done(), "the Future has no outcome yet"
        return future.exception() if future.exception() is not None else future.result()
