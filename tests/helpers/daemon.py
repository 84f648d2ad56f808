"""A real ``gpuvisor serve`` in a subprocess for the tests. By default it gets
a real sd_notify socket, so a test waits for READY=1 rather than sleeping and
can read every notification the daemon sent.

The client is imported only where it is used: a test of the wire written
from the protocol document alone starts daemons here too, and imports no
project package for it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.helpers import T, repo_pythonpath, wait_until
from tests.helpers.notify import NotifyReceiver

GPUVISOR = str(Path(sys.executable).with_name("gpuvisor"))
"""The console script, as installed beside this interpreter."""


def free_port() -> int:
    """A loopback TCP port nothing listens on (for a moment)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stale_socket(path: str | Path) -> None:
    """What a killed daemon leaves: the socket file, and nothing listening."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()


class RunningDaemon:
    """One ``gpuvisor serve`` process, in a directory of its own, with its
    output in a file (a pipe nobody reads could block it)."""

    def __init__(self, *args: str, argv: Sequence[str] | None = None, config_text: str | None = None,
                 endpoint: str | None = None, env: Mapping[str, str | None] | None = None, cwd: str | None = None,
                 umask: int = -1, notify: bool = True, wait_ready: bool = True, stderr: int | None = None):  # fmt: skip
        """By default ``python -m supervisor.service.cli`` with ``args`` and
        ``config_text`` (as ``--config``), on an endpoint of its own unless
        ``args`` name one. ``argv`` runs that command line instead, exactly
        as given (the console script, the unit's ExecStart line);
        ``endpoint`` then says where it serves if ``argv`` does not.

        ``env``: changes to this process's environment (None removes a
        variable), over the repository put first on PYTHONPATH so workers
        can import the test loaders. ``notify``: NOTIFY_SOCKET names a
        receiver, as under systemd, and READY=1 says the daemon is ready;
        without it the daemon runs as from a shell and is ready once it
        answers a ping. ``stderr``: a file descriptor for the daemon's output
        instead of the file ``output()`` reads."""
        if argv is not None and (args or config_text is not None):
            raise ValueError("argv is the whole command line: args and config_text do not go with it")
        self.dir = tempfile.mkdtemp(prefix="gv-")  # short: a socket path must stay under 108 bytes
        self.config = None
        if argv is None:
            argv = [sys.executable, "-m", "supervisor.service.cli"]
            if "--endpoint" not in args:
                argv += ["--endpoint", endpoint or f"ipc://{self.dir}/run/g.sock"]
            if config_text is not None:
                self.config = os.path.join(self.dir, "g.toml")
                with open(self.config, "w") as f:
                    f.write(config_text)
                argv += ["--config", self.config]
            argv += [*args, "serve"]
        if endpoint is None and "--endpoint" in argv:
            endpoint = argv[max(i for i, arg in enumerate(argv) if arg == "--endpoint") + 1]  # the last one wins
        self.endpoint = endpoint
        self.notify = NotifyReceiver(os.path.join(self.dir, "notify")) if notify else None
        full_env = dict(os.environ, PYTHONPATH=repo_pythonpath())
        if self.notify is not None:
            full_env["NOTIFY_SOCKET"] = self.notify.address
        for name, value in (env or {}).items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        self._log = open(os.path.join(self.dir, "output"), "w+")
        out = self._log if stderr is None else stderr
        self.proc = subprocess.Popen(list(argv), env=full_env, cwd=cwd, umask=umask, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        if wait_ready:
            try:
                if self.notify is not None:
                    self.wait_note("READY=1")
                else:
                    wait_until(self._answers, T, "the daemon to answer a ping")
            except BaseException:
                self.close()
                raise

    @property
    def notes(self) -> list[str]:
        """Every sd_notify line the daemon sent, in order."""
        assert self.notify is not None, "started with notify=False"
        return self.notify.notes

    def running(self) -> bool:
        return self.proc.poll() is None

    def _answers(self) -> bool:
        from supervisor.client import Client

        assert self.running(), f"the daemon exited with {self.proc.returncode}: {self.output()}"
        try:
            with Client(self.endpoint, timeout=1) as c:
                return bool(c.ping())
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def wait_note(self, line: str, after: int = 0, timeout: float = T) -> int:
        """Wait for a notification line; returns its index in ``notes``."""
        assert self.notify is not None, "started with notify=False"
        found = self.notify.wait_note(line, after, timeout, alive=self.running)
        if found is None:
            raise AssertionError(f"the daemon exited ({self.proc.returncode}) before {line!r}: {self.output()}")
        return found

    def ready(self, timeout: float = T) -> bool:
        """True once the daemon said READY=1; False if it exited first."""
        assert self.notify is not None, "started with notify=False"
        return self.notify.wait_note("READY=1", timeout=timeout, alive=self.running) is not None

    def client(self, **kwargs):
        from supervisor.client import Client

        return Client(self.endpoint, **kwargs)

    def output(self) -> str:
        """Everything the daemon printed so far (its log is on stderr)."""
        with open(self._log.name) as f:
            return f.read()

    def wait(self, timeout: float = T) -> int:
        """The daemon's exit status, once it has exited by itself."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout}s: {self.output()}") from None

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; its exit status."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait()
        except AssertionError:
            self.proc.kill()
            self.proc.wait(T)
            raise

    def close(self) -> None:
        """Stop the daemon if it runs (without draining; killed if it will
        not go) and remove what it left."""
        if self.running():
            try:
                if self.endpoint is None:
                    self.proc.send_signal(signal.SIGTERM)
                else:
                    with self.client(timeout=2) as c:
                        c.shutdown(drain=False)
                self.proc.wait(T)
            except Exception:  # noqa: BLE001 - teardown must not leave the daemon running
                self.proc.kill()
                self.proc.wait(T)
        if self.notify is not None:
            self.notify.close()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def serving(config_text: str, mode: str | None = None, timeout: float = T) -> Iterator[RunningDaemon]:
    """A daemon over ``config_text`` for a module's cases, with ``mode``
    loaded before the first (so nothing starts during a case); after them,
    its output holds no traceback: every refusal was an answer, not a crash."""
    d = RunningDaemon(config_text=config_text)
    try:
        if mode is not None:
            with d.client() as c:
                wait_until(lambda: c.status()["mode"] == mode, timeout, f"the {mode} mode to load")
        yield d
        assert "Traceback" not in d.output(), d.output()[-4000:]
    finally:
        d.close()
