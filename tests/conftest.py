"""Shared fixtures. Every wait is bounded and says what it waited for, and
every test ends by checking that no process it spawned is left behind."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import psutil
import pytest

from supervisor import Supervisor
from supervisor.engine import gpu
from tests.helpers import repo_pythonpath, wait_until
from tests.helpers.daemon import RunningDaemon
from tests.helpers.fake_nvml import FakeNvml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
