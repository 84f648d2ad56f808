"""Start a worker process and signal it. The only module that signals.

The loop never waits on a child: it sends SIGTERM (or SIGKILL) to the
worker's process group and goes on; the worker's pidfd tells it when to
reap, and a deadline escalates to SIGKILL. Signals go to the group, so no
grandchild (a compiler, a data loader) is left holding memory. The one
blocking stop, ``stop_and_reap``, is for the paths where the loop itself is
gone (its crash, the interpreter's exit).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from protocol import EXIT_MEANINGS, WorkerExit

log = logging.getLogger("gpuvisor")

# Variables that belong to the supervisor's own service manager and must not
# make the worker think it is the service (systemd would get its notifications).
_PRIVATE_ENV_PREFIXES = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")

WORKER_CWD = "/"
"""Where every worker runs, whatever the daemon's working directory: a
``worker.py`` or ``protocol.py`` left there must not replace ours, nor a
folder named like a model make ``from_pretrained("name")`` read it. ``/``
is where systemd starts services, so a setup tried in a shell behaves as
it will in production."""

BUILT_IN_WORKER = (sys.executable, "-P", "-m", "worker")
"""This interpreter as the worker. ``-P``: no working directory on its
``sys.path``; ``PYTHONSAFEPATH=1`` in every worker's environment says the
same to an interpreter a ``worker_command`` wrapper starts."""


class UnkillableWorker(RuntimeError):
    """The worker survived SIGKILL past the wait (a process stuck in the
    kernel, state D). Nothing more can be done from user space."""


def worker_env(device_env: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without the service manager's variables, plus the
    device pinning (CUDA_VISIBLE_DEVICES): the worker sees only its GPU.
    ``PYTHONSAFEPATH``: see ``BUILT_IN_WORKER``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIXES)}
    return {**env, "PYTHONSAFEPATH": "1", **(device_env or {})}


def worker_argv(command: tuple[str, ...], endpoint: str, gen: int, heartbeat_interval: float) -> list[str]:
    """``command`` (default: this interpreter with ``-P -m worker``) plus the
    four arguments every worker takes; docs/protocol.md has the contract."""
    return [
        *(command or BUILT_IN_WORKER),
        "--endpoint",
        endpoint,
        "--gen",
        str(gen),
        "--parent-pid",
        str(os.getpid()),
        "--heartbeat-interval",
        repr(heartbeat_interval),
    ]


def standby_argv(endpoint: str) -> list[str]:
    """The built-in worker as a warm standby (``supervisor/standby.py``)."""
    return [*BUILT_IN_WORKER, "--endpoint", endpoint, "--parent-pid", str(os.getpid()), "--standby"]


def spawn_worker(
    argv: list[str], device_env: dict[str, str] | None = None, stdin=subprocess.DEVNULL, pass_fds: tuple = ()
) -> subprocess.Popen:
    """Start a worker in a process group of its own, so it can be killed as a
    tree, and so a Ctrl-C meant for the supervisor does not reach it (the
    supervisor decides how it stops). Its stdout goes to our stderr: a worker
    must never write into a CLI's machine-readable output. Its stderr comes
    to the loop through a pipe (see engine.stderr). It runs in
    ``WORKER_CWD``."""
    return subprocess.Popen(
        argv,
        cwd=WORKER_CWD,
        stdin=stdin,
        stdout=2,
        stderr=subprocess.PIPE,  # the loop passes it on and keeps the tail for crash reports
        start_new_session=True,
        env=worker_env(device_env),
        close_fds=True,
        pass_fds=pass_fds,
    )


def signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_and_reap(proc: subprocess.Popen, grace: float, *, kill_now: bool = False) -> int:
    """Stop ``proc`` and its group and reap it, waiting; returns its exit
    status. Only where no loop is left to wait for a pidfd.

    ``kill_now`` skips SIGTERM: used when the worker is known stuck (timeout,
    hang), where waiting out a grace period only delays the caller."""
    if proc.poll() is None:
        if not kill_now:
            signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d ignored SIGTERM for %.1fs; sending SIGKILL", proc.pid, grace)
        if proc.poll() is None:
            signal_group(proc, signal.SIGKILL)
            try:
                proc.wait(max(grace, 5.0))
            except subprocess.TimeoutExpired:
                raise UnkillableWorker(f"worker pid {proc.pid} survived SIGKILL for {max(grace, 5.0):.0f}s") from None
    signal_group(proc, signal.SIGKILL)  # grandchildren left in the group
    return proc.returncode


class Processes:
    """The calls the engine makes on worker processes: start one, signal its
    group, watch for its end, and (only once no loop is left) stop and reap
    it waiting. The engine takes these as an argument so that a test can
    step it against fake processes (``tests/helpers/fake_world.py``)."""

    def start(self, argv: list[str], device_env: dict[str, str]) -> subprocess.Popen:
        return spawn_worker(argv, device_env)

    def signal(self, proc: subprocess.Popen, sig: signal.Signals) -> None:
        signal_group(proc, sig)

    def pidfd(self, proc: subprocess.Popen) -> int | None:
        """A descriptor that becomes readable when ``proc`` ends; None where
        ``pidfd_open`` is missing (the loop then looks every 50 ms)."""
        try:
            return os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            return None

    def stop_and_reap(self, proc: subprocess.Popen, grace: float, *, kill_now: bool = False) -> int:
        return stop_and_reap(proc, grace, kill_now=kill_now)


def describe_exit(returncode: int | None, *, loading: bool = False) -> str:
    """``killed by SIGSEGV(-11)`` or ``exited with code 3``: the words a person
    needs to tell a segfault from an OOM kill from a clean exit."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}({returncode})"
    meaning = {int(code): text for code, text in EXIT_MEANINGS.items()}.get(returncode)
    if returncode == WorkerExit.LOAD_FAILED and not loading:
        meaning = None  # a handler's own exit(3) is not a failed load
    return f"exited with code {returncode}" + (f" ({meaning})" if meaning else "")
