"""Helpers shared by the benchmarks: child processes that are always reaped,
and the built-in config with a few settings changed."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection

import msgpack
import psutil
import zmq

from supervisor import config as config_mod
from supervisor.config import Config


def config(**overrides) -> Config:
    """The built-in config with ``overrides`` (fields the Config of this
    checkout lacks are refused, so a typo cannot pass silently)."""
    return dataclasses.replace(config_mod.load(None), **overrides)


def has_setting(name: str) -> bool:
    return name in Config.__dataclass_fields__


_SCRATCH: list[str] = []


def scratch_dir() -> str:
    """A private temporary directory, removed when the bench exits."""
    path = tempfile.mkdtemp(prefix="gv-bench-")
    if not _SCRATCH:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _SCRATCH])
    _SCRATCH.append(path)
    return path


def ipc_endpoint(name: str = "bench.sock") -> str:
    return f"ipc://{scratch_dir()}/{name}"


@contextlib.contextmanager
def child(script: str, *args: str, **popen) -> Iterator[subprocess.Popen]:
    """``python -c script args``; killed (if still running) and reaped on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], **popen)
    try:
        yield proc
    finally:
        reap(proc)


@contextlib.contextmanager
def pipe_child(script: str) -> Iterator[Connection]:
    """A ``multiprocessing.Pipe()`` to ``python -c script FD``: the same
    socketpair-backed ``Connection`` on both ends (the child opens it with
    ``Connection(int(sys.argv[1]))``), started with subprocess rather than a
    spawn context, which would leave a resource-tracker process behind.
    Closing our end is the child's EOF; it is reaped on the way out."""
    ours, theirs = socket.socketpair()
    try:
        proc = subprocess.Popen([sys.executable, "-c", script, str(theirs.fileno())], pass_fds=(theirs.fileno(),))
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    conn = Connection(ours.detach())
    try:
        yield conn
    finally:
        conn.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        reap(proc)


def reap(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End ``proc`` (SIGTERM, then SIGKILL after ``grace``) and wait for it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def wait_quiet(pid: int, timeout: float = 90.0, interval: float = 0.25, cpu: float = 0.02) -> float:
    """Wait until process ``pid`` uses under ``cpu`` CPU seconds per
    ``interval`` (e.g. a warm standby that has finished its imports).
    Returns the seconds waited; ``timeout`` bounds it."""
    t0 = time.monotonic()
    try:
        p = psutil.Process(pid)
        last = sum(p.cpu_times()[:2])
        while time.monotonic() - t0 < timeout:
            time.sleep(interval)
            now = sum(p.cpu_times()[:2])
            if now - last < cpu:
                break
            last = now
    except psutil.Error:
        pass
    return time.monotonic() - t0


# The floor of this stack: a raw DEALER echo with msgpack, in a child process.
# Unlimited high-water marks, so that a pipelined run cannot deadlock.
RAW_ECHO = """
import sys, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.SNDHWM, 0); s.setsockopt(zmq.RCVHWM, 0)
s.connect(sys.argv[1])
s.send(msgpack.packb({"k": "hello"}))
while True:
    m = msgpack.unpackb(s.recv())
    if m.get("k") == "stop": break
    s.send(msgpack.packb({"k": "result", "job": m["job"], "value": m["payload"]}))
s.close(); ctx.term()
"""


@contextlib.contextmanager
def raw_echo(name: str) -> Iterator[tuple[zmq.Socket, bytes]]:
    """A ROUTER bound to a fresh endpoint with ``RAW_ECHO`` connected: yields
    the socket and the echo's routing id; stops and reaps the echo after."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.ROUTER_MANDATORY, 1)):
        router.setsockopt(option, value)
    endpoint = ipc_endpoint(name)
    router.bind(endpoint)
    try:
        with child(RAW_ECHO, endpoint) as proc:
            ident, _ = router.recv_multipart()
            yield router, ident
            router.send_multipart([ident, msgpack.packb({"k": "stop"})])
            proc.wait(30)
    finally:
        router.close()
        ctx.term()


def run_callers(callers: list, timeout: float = 600) -> tuple[float, list]:
    """Each of ``callers`` (a function returning the Futures it submitted)
    on a thread of its own, released at once; the seconds until every
    Future has its result, and the results."""
    import threading

    gate = threading.Barrier(len(callers) + 1)
    futures: list = []
    lock = threading.Lock()

    def call(submit) -> None:
        gate.wait()
        mine = submit()
        with lock:
            futures.extend(mine)

    threads = [threading.Thread(target=call, args=(c,)) for c in callers]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    gate.wait()
    for th in threads:
        th.join()
    results = [f.result(timeout) for f in futures]
    return time.perf_counter() - t0, results


def free_port() -> int:
    """A loopback TCP port nothing listens on now (free until someone else takes it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_daemon(folder: str, timeout: float = 60.0, config_file: str | None = None):
    """``gpuvisor serve`` (the built-in config, or ``config_file``) on
    ``ipc://FOLDER/run/g.sock``, its output in ``FOLDER/daemon.log`` (a
    file: a pipe nobody reads could block it). Returns once it answers a
    ping: (the process, its endpoint, the log, a Client connected to it,
    which the caller closes)."""
    import os

    from protocol import DaemonUnavailable
    from supervisor.client import Client

    endpoint = f"ipc://{folder}/run/g.sock"
    chosen = ["--config", config_file] if config_file else []
    log = open(os.path.join(folder, "daemon.log"), "w+")  # noqa: SIM115 - the caller closes it with the daemon
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.service.cli", *chosen, "--endpoint", endpoint, "serve"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode} before answering a ping")
            client = Client(endpoint, timeout=2.0)
            try:
                client.ping()
                return proc, endpoint, log, client
            except DaemonUnavailable:
                client.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not answer a ping within {timeout:g}s") from None
                time.sleep(0.1)
    except BaseException:  # nobody else holds the daemon yet: reap it here, and show why it did not start
        reap(proc)
        log.seek(0)
        print("".join(log.readlines()[-20:]), file=sys.stderr)
        log.close()
        raise
