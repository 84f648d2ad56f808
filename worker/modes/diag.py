"""``diag``: tasks for tests and operators. Imports no torch, loads in
milliseconds, and can fail or die on request so every fault path can be
driven for real."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any


def _payload_map(payload: Any, task: str) -> dict:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise TypeError(f"{task}: payload must be a map, got {type(payload).__name__}")
    return payload


def echo(payload: Any) -> Any:
    return payload


def sleep(payload: Any) -> dict:
    seconds = _payload_map(payload, "sleep").get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds < 0:
        raise ValueError(f"sleep: 'seconds' must be a non-negative number, got {seconds!r}")
    time.sleep(seconds)
    return {"slept": seconds}


def pid(payload: Any) -> int:
    return os.getpid()


def fail(payload: Any) -> None:
    message = _payload_map(payload, "fail").get("message", "diag.fail was asked to fail")
    raise RuntimeError(message)


def crash(payload: Any) -> None:
    """Die the way the payload says: ``exit`` (status ``code``, default 3),
    ``segfault`` (a real SIGSEGV from a null read) or ``kill`` (SIGKILL)."""
    args = _payload_map(payload, "crash")
    how = args.get("how", "exit")
    if how == "exit":
        os._exit(int(args.get("code", 3)))
    if how == "segfault":
        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise ValueError(f"crash: 'how' must be 'exit', 'segfault' or 'kill', got {how!r}")


def load(**args: Any) -> dict:
    if args:
        raise TypeError(f"diag takes no arguments, got {sorted(args)}")
    return {"echo": echo, "sleep": sleep, "pid": pid, "fail": fail, "crash": crash}
