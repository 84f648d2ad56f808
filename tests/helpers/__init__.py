"""What the tests share: the one bound on waits, the bounded wait itself,
where the repository is, a fresh interpreter. The rest lives in modules named
for what they are: ``config`` (config text), ``daemon`` (a real ``gpuvisor
serve``), ``notify`` (systemd's side of sd_notify), ``script`` (a user's
program around a Supervisor, in its own process), ``harness`` (the
supervisor's side of one worker), ``loaders`` (the test modes), ``fake_nvml``
(NVML where there is none), ``raw_client`` and ``foreign_worker`` (a client
and a worker written from the protocol document alone), and
``gpu_inprocess_probe`` (what an in-process cleanup leaves on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

T = 60
"""Seconds any one wait may take before the test fails as hung. It only stops
hangs: nothing in the suite asserts that something is fast (performance is
measured in bench/), so it is generous for a loaded machine. A wait that is
longer by nature (a model load, a chaos run) uses a multiple of it."""

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it is truthy; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer names a live process (a zombie counts as
    alive: it has not been reaped)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    """``code`` run to the end in a fresh interpreter, which must succeed:
    a clean ``sys.modules`` shows what an import really pulls in."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T, check=True, **kwargs)


def repo_pythonpath() -> str:
    """PYTHONPATH with the repository first, for a child process whose workers
    must import ``tests.helpers.loaders``."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
