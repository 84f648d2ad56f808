"""Helpers shared by the benchmarks: child processes that are always reaped,
and the built-in config with a few settings changed."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import psutil

from supervisor import config as config_mod
from supervisor.config import Config


def config(**overrides) -> Config:
    """The built-in config with ``overrides`` (fields the Config of this
    checkout lacks are refused, so a typo cannot pass silently)."""
    return dataclasses.replace(config_mod.load(None), **overrides)


def has_setting(name: str) -> bool:
    return name in Config.__dataclass_fields__


def ipc_endpoint(name: str = "bench.sock") -> str:
    return f"ipc://{tempfile.mkdtemp(prefix='gv-bench-')}/{name}"


@contextlib.contextmanager
def child(script: str, *args: str, **popen) -> Iterator[subprocess.Popen]:
    """``python -c script args``; killed (if still running) and reaped on the way out."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], **popen)
    try:
        yield proc
    finally:
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
    import time

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
