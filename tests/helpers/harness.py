"""A test playing the supervisor: a real ROUTER socket and one real
``python -m worker`` process connected to it, on its two sockets: the job
socket (routing id ``g<gen>``) and the heartbeat socket (``h<gen>``)."""

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

    def __init__(self, gen: int = 1, parent_pid: int | None = None, env: dict | None = None, stderr=subprocess.PIPE,
                 max_message_bytes: int | None = None):  # fmt: skip
        """``max_message_bytes``: the ROUTER's MAXMSGSIZE, past which libzmq
        drops the connection that sent the frame."""
        self.ctx = zmq.Context()
        self.dir = tempfile.mkdtemp(prefix="gpuvisor-test-")
        self.endpoint = f"ipc://{self.dir}/w.sock"
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        if max_message_bytes is not None:
            self.router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.router.bind(self.endpoint)
        self.identity = f"g{gen}".encode()
        self.heartbeat_identity = f"h{gen}".encode()
        self.raw_frames: list[bytes] = []  # every frame the worker sent, on either socket
        self.heartbeats: list[Heartbeat] = []  # every heartbeat received, skipped or not
        cmd = [sys.executable, "-m", "worker", "--endpoint", self.endpoint, "--gen", str(gen),
               "--parent-pid", str(parent_pid or os.getpid()), "--heartbeat-interval", "0.1"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stderr=stderr, env=env)

    def recv(self, skip_heartbeats: bool = True, timeout: float = T):
        """The next message from either socket. Heartbeats must come on the
        heartbeat socket and everything else on the job socket."""
        while True:
            if not self.router.poll(timeout * 1000):
                raise AssertionError(f"no message from the worker within {timeout}s")
            identity, *frames = self.router.recv_multipart()
            assert identity in (self.identity, self.heartbeat_identity), identity
            self.raw_frames.extend(frames)
            msg = decode_from_worker(frames)
            assert isinstance(msg, Heartbeat) == (identity == self.heartbeat_identity), (identity, msg)
            if isinstance(msg, Heartbeat):
                self.heartbeats.append(msg)
                if skip_heartbeats:
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
