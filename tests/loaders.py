"""Loaders that misbehave on purpose, for the load-failure tests. Imported
only in worker processes (the tests put the repo root on PYTHONPATH)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time


def raises(**_: object) -> dict:
    raise RuntimeError("this loader fails on purpose")


def segfaults(**_: object) -> dict:
    ctypes.string_at(0)
    return {}


def exits(code: int = 9, **_: object) -> dict:
    os._exit(code)


def kills_itself(**_: object) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def says_then_exits(**_: object) -> dict:
    print("loader's last words: CUDA out of memory (pretend)", file=sys.stderr, flush=True)
    os._exit(9)


def hangs(seconds: float = 600, **_: object) -> dict:
    time.sleep(seconds)
    return {}


def not_a_mapping(**_: object) -> list:
    return ["echo"]


def tagged(tag: str = "x") -> dict:
    """A mode whose jobs say which mode ran them."""
    return {"tag": lambda payload: {"tag": tag, "pid": os.getpid()}}
