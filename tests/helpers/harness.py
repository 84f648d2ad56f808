"""A test playing the supervisor: a real ROUTER socket and one real
``python -m worker`` process connected to it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import zmq

from protocol import Heartbeat, decode_from_worker, encode
from tests.helpers import T


class Harness:
    """A ROUTER socket and one ``python -m worker`` process connected to it."""

    def __init__(self, gen: int = 1, parent_pid: int | None = None, env: dict | None = None, stderr=subprocess.PIPE):
        self.ctx = zmq.Context()
        self.dir = tempfile.mkdtemp(prefix="gpuvisor-test-")
        self.endpoint = f"ipc://{self.dir}/w.sock"
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self.identity = f"g{gen}".encode()
        self.raw_frames: list[bytes] = []
        cmd = [sys.executable, "-m", "worker", "--endpoint", self.endpoint, "--gen", str(gen),
               "--parent-pid", str(parent_pid or os.getpid()), "--heartbeat-interval", "0.1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=stderr, env=env)

    def recv(self, skip_heartbeats: bool = True, timeout: float = T):
        while True:
            if not self.router.poll(timeout * 1000):
                raise AssertionError(f"no message from the worker within {timeout}s")
            identity, *frames = self.router.recv_multipart()
            assert identity == self.identity
            self.raw_frames.extend(frames)
            msg = decode_from_worker(frames)
            if skip_heartbeats and isinstance(msg, Heartbeat):
                continue
            return msg

    def send(self, msg) -> None:
        self.router.send_multipart([self.identity, *encode(msg)])

    def send_raw(self, *frames: bytes) -> None:
        self.router.send_multipart([self.identity, *frames])

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(T)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.router.close()
        self.ctx.term()
        return code
