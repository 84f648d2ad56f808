"""The worker's heartbeat thread, and the sends both of its threads share.

The heartbeat thread owns a socket of its own, so heartbeats keep coming
while a handler runs for minutes; each tick also checks that the supervisor
is alive (``worker.lifeline``), and the thread watches the job socket's
connection, since a dropped connection must end the worker even while its
main thread is busy (``worker.runtime`` draws both threads). A send that
cannot get out within ``SEND_TIMEOUT_MS`` means the supervisor is gone:
either thread then ends the worker.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import Heartbeat, WorkerExit, encode
from protocol.frames import small
from worker.lifeline import exit_if_orphaned
from worker.memory import torch_memory

# A DEALER blocks a send for as long as it has no peer. Past this, the
# supervisor is unreachable: waiting longer would leave a job unanswered
# (main thread) or stop the orphan check (heartbeat thread).
SEND_TIMEOUT_MS = 3000


def log_line(gen: int, text: str) -> None:
    """One line to stderr, which is a pipe to the supervisor: when the
    supervisor is gone the write fails, and a log line must never be what
    stops the worker from noticing that."""
    try:
        print(f"gpuvisor-worker[gen {gen} pid {os.getpid()}]: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def exit_disconnected(gen: int, why: str) -> None:
    log_line(gen, f"{why}; exiting")
    os._exit(WorkerExit.DISCONNECTED)


def send_or_exit(sock: zmq.Socket, frames: list, gen: int, copy: bool | None = None) -> None:
    try:
        sock.send_multipart(frames, copy=small(frames) if copy is None else copy)
    except zmq.Again:
        exit_disconnected(gen, f"could not send to the supervisor for {SEND_TIMEOUT_MS / 1000:g}s")


class HeartbeatThread(threading.Thread):
    """Owns the heartbeat socket and the job socket's monitor; see the module
    docstring. It ends when the main thread stops the monitor (the monitor
    socket then says MONITOR_STOPPED)."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, gen: int, parent_pid: int, interval: float, monitor: zmq.Socket
    ):
        super().__init__(name="gpuvisor-worker-heartbeat", daemon=True)
        self._ctx, self._endpoint, self._gen = ctx, endpoint, gen
        self._parent_pid, self._interval, self._monitor = parent_pid, interval, monitor

    def run(self) -> None:
        try:
            self._beat()
        except BaseException as exc:  # noqa: BLE001 - without this thread the worker is blind to its supervisor
            log_line(self._gen, f"heartbeat thread failed ({type(exc).__name__}: {exc}); exiting")
            os._exit(WorkerExit.DISCONNECTED)

    def _beat(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.ROUTING_ID, f"h{self._gen}".encode())
            sock.setsockopt(zmq.LINGER, 0)  # a heartbeat left unsent at exit means nothing
            sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            sock.connect(self._endpoint)
            next_beat = 0.0
            while True:
                now = time.monotonic()
                if now >= next_beat:
                    exit_if_orphaned(self._parent_pid)
                    send_or_exit(sock, encode(Heartbeat(torch_memory())), self._gen)
                    next_beat = now + self._interval
                wait_ms = max(0, round((next_beat - time.monotonic()) * 1000))
                if self._monitor.poll(wait_ms):
                    event = recv_monitor_message(self._monitor)["event"]
                    if event == zmq.EVENT_MONITOR_STOPPED:
                        return
                    # A dropped connection is fatal, never silently healed by a
                    # reconnect: the supervisor drops it when we send a frame
                    # over its limit, and whatever we were answering is lost.
                    exit_disconnected(self._gen, "the supervisor dropped our connection")
        finally:
            self._monitor.close(linger=0)
            sock.close()
