"""A real ``gpuvisor serve`` in a subprocess for the tests, with a real
sd_notify datagram socket: the test waits for READY=1 rather than sleeping,
and can read every notification the daemon sent."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from supervisor.client import Client
from tests.conftest import ROOT

T = 60


class RunningDaemon:
    def __init__(self, *args: str, config_text: str | None = None, env: dict | None = None, umask: int = -1,
                 wait_ready: bool = True, stderr: int | None = None):  # fmt: skip
        """``stderr``: a file descriptor for the daemon's stderr (and stdout)
        instead of the log file ``output()`` reads."""
        self.dir = tempfile.mkdtemp(prefix="gv-")
        self.endpoint = args[args.index("--endpoint") + 1] if "--endpoint" in args else f"ipc://{self.dir}/run/g.sock"
        self.config = None
        if config_text is not None:
            self.config = os.path.join(self.dir, "g.toml")
            with open(self.config, "w") as f:
                f.write(config_text)
        self.notes: list[str] = []
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(os.path.join(self.dir, "notify"))
        self._notify.settimeout(0.2)
        self._stop_reading = threading.Event()
        self._reader = threading.Thread(target=self._read_notes, daemon=True)
        self._reader.start()
        full_env = dict(os.environ, NOTIFY_SOCKET=os.path.join(self.dir, "notify"))
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "supervisor.service.cli"]
        if "--endpoint" not in args:
            cmd += ["--endpoint", self.endpoint]
        if self.config is not None:
            cmd += ["--config", self.config]
        self._log = open(os.path.join(self.dir, "stderr.log"), "w+")  # a file: a pipe nobody reads could block it
        out = self._log if stderr is None else stderr
        self.proc = subprocess.Popen([*cmd, *args, "serve"], env=full_env, umask=umask,
                                     stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if wait_ready:
            self.wait_note("READY=1")

    def _read_notes(self) -> None:
        while not self._stop_reading.is_set():
            try:
                self.notes.extend(self._notify.recv(65536).decode().split("\n"))
            except (TimeoutError, OSError):
                continue

    def wait_note(self, line: str, after: int = 0, timeout: float = T) -> int:
        """Wait for a notification line; returns its index in ``notes``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, note in enumerate(self.notes[after:], after):
                if note == line or (line.endswith("=") and note.startswith(line)):
                    return i
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited ({self.proc.returncode}) before {line!r}: {self.output()}")
            time.sleep(0.01)
        raise AssertionError(f"no {line!r} from the daemon within {timeout}s; got {self.notes}")

    def client(self, **kwargs) -> Client:
        return Client(self.endpoint, **kwargs)

    def output(self) -> str:
        """Everything the daemon printed so far (its log is on stderr)."""
        with open(self._log.name) as f:
            return f.read()

    def wait(self, timeout: float = T) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                with self.client(timeout=2) as c:
                    c.shutdown(drain=False)
                self.proc.wait(T)
            except Exception:  # noqa: BLE001 - teardown must not leave the daemon running
                self.proc.kill()
                self.proc.wait(T)
        self._stop_reading.set()
        self._reader.join(5)
        self._notify.close()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
