"""Shared fixtures. Every wait is bounded and says what it waited for, and
every test ends by checking that no process it spawned is left behind.

Every test carries exactly one layer marker (see ``LAYERS``), most through
its module's ``pytestmark``; collection stops with the list of those that
carry none or several. A ``unit`` test is held to its word while it runs:
starting a process, opening a ZeroMQ socket or sleeping fails it, so
``pytest -m unit`` stays a layer of milliseconds that a laptop runs in
seconds (docs/operations.md, "The test layers")."""

from __future__ import annotations

import _posixsubprocess
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import zmq

from supervisor import Supervisor
from supervisor.engine import gpu
from tests.helpers import repo_pythonpath, wait_until
from tests.helpers.daemon import RunningDaemon
from tests.helpers.fake_nvml import FakeNvml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LAYERS = ("unit", "process", "daemon", "gpu")
"""The layers, from fast to slow; pyproject.toml registers and describes them."""


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
"""Each example's own tests, written as a mode's author writes them (no
marker of ours): each starts its mode's worker, so they are ``process``."""


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects: the examples' layer must be there to select by
def pytest_collection_modifyitems(config, items):
    """Every test in exactly one layer, or the run stops before it starts."""
    wrong = []
    for item in items:
        layers = {mark.name for mark in item.iter_markers() if mark.name in LAYERS}
        if not layers and item.path.is_relative_to(EXAMPLES):
            item.add_marker(pytest.mark.process)
            layers = {"process"}
        if len(layers) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(sorted(layers)) or 'none'}")
    if wrong:
        raise pytest.UsageError(
            f"each test carries exactly one layer marker of {sorted(LAYERS)} (a module's pytestmark, or the "
            f"test's own in a module of several layers); these do not:\n" + "\n".join(wrong)
        )


class _UnitGuard:
    """What a unit test may not do, refused where it is tried, and recorded
    in case the code under test swallows the refusal."""

    # Every way Python starts a process ends in one of these: subprocess in
    # the fork_exec it imported, multiprocessing in _posixsubprocess's, the
    # rest in os.
    _STARTS = [
        (owner, name)
        for owner, name in [(subprocess, "_fork_exec"), (_posixsubprocess, "fork_exec")]
        + [(os, name) for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system")]
        if getattr(owner, name, None) is not None
    ]

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tried: list[str] = []
        for owner, name in self._STARTS:
            monkeypatch.setattr(owner, name, self._refuse(f"start a process ({owner.__name__}.{name})"))
        monkeypatch.setattr(zmq.Socket, "__init__", self._refuse("open a ZeroMQ socket"))
        sleep = time.sleep
        main = threading.main_thread()
        refuse_sleep = self._refuse("sleep")

        def no_sleep_here(seconds: float) -> None:
            if threading.current_thread() is main:
                refuse_sleep(seconds)
            sleep(seconds)  # another thread's (one left by an earlier test) is not this test's doing

        monkeypatch.setattr(time, "sleep", no_sleep_here)

    def _refuse(self, what: str):
        def refuse(*args, **kwargs):
            self.tried.append(what)
            raise AssertionError(f"a unit test may not {what}: mark it process (or daemon) instead")

        return refuse


@pytest.fixture(autouse=True)
def _unit_layer_holds(request):
    """A ``unit`` test starts no process, opens no ZeroMQ socket and does
    not sleep, even where the code it drives catches the error."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    with pytest.MonkeyPatch.context() as monkeypatch:
        guard = _UnitGuard(monkeypatch)
        yield
    if guard.tried:
        pytest.fail(f"this unit test tried to {', '.join(dict.fromkeys(guard.tried))}")


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Teardown check: the test reaped every process it started (processes
    of a longer-lived fixture, already there when it began, are not its own)."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def new_children():
        return [p for p in me.children(recursive=True) if p.pid not in before]

    def none_left():
        return not new_children()

    try:
        wait_until(none_left, 10.0, "the test's child processes to be reaped")
    except AssertionError:
        left = [(p.pid, p.status(), " ".join(p.cmdline()[:6])) for p in new_children()]
        for p in new_children():
            p.kill()
        pytest.fail(f"child processes left behind: {left}")


@pytest.fixture
def sup():
    s = Supervisor()
    s.start()
    yield s
    s.shutdown(drain=False)


@pytest.fixture
def helper_loaders(monkeypatch):
    """Make ``tests.helpers.loaders`` importable in worker processes."""
    monkeypatch.setenv("PYTHONPATH", repo_pythonpath())
    return "tests.helpers.loaders"


@pytest.fixture
def write_config(tmp_path):
    def write(text: str) -> Path:
        path = tmp_path / "gpuvisor.toml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def supervisor_from(write_config, helper_loaders):
    """``supervisor_from(toml_text)`` -> a started Supervisor over that config
    (test loaders importable), stopped without draining after the test."""
    made: list[Supervisor] = []

    def make(text: str) -> Supervisor:
        sup = Supervisor(write_config(text)).start()
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.shutdown(drain=False)


@pytest.fixture(autouse=True)
def _log_level(caplog):
    caplog.set_level(logging.INFO, logger="gpuvisor")


@pytest.fixture(scope="session", autouse=True)
def no_children_at_the_end():
    """After every fixture has torn down, nothing at all is left."""
    yield
    me = psutil.Process()
    wait_until(lambda: not me.children(recursive=True), 10.0, "every child process of the test session to be reaped")


@pytest.fixture
def daemon():
    """``daemon(...)`` -> a started ``RunningDaemon`` (see its arguments),
    stopped and cleaned up after the test."""
    made: list[RunningDaemon] = []

    def start(*args: str, **kwargs) -> RunningDaemon:
        d = RunningDaemon(*args, **kwargs)
        made.append(d)
        return d

    yield start
    for d in made:
        d.close()


@pytest.fixture
def fake_nvml(monkeypatch):
    """``fake_nvml(FakeNvml(...))`` makes it this process's pynvml, with
    NVML not yet initialised; all undone after the test."""

    def install(fake: FakeNvml) -> FakeNvml:
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        monkeypatch.setattr(gpu, "_init_pid", None)
        return fake

    return install
