"""Loaders for the respawn tests: a mode that fails to load while a marker
file exists, and one that loads slowly enough to be killed while loading.
Imported only in worker processes (the tests put the repo root on PYTHONPATH)."""

from __future__ import annotations

import os
import time


def fails_while_file_exists(path: str) -> dict:
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists, so this mode refuses to load")
    return {"pid": lambda payload: os.getpid(), "echo": lambda payload: payload}


def slow(seconds: float = 0.3) -> dict:
    time.sleep(seconds)
    return {"pid": lambda payload: os.getpid(), "echo": lambda payload: payload}
