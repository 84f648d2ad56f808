"""Loaders for the flow-control tests. Imported only in worker processes
(the tests put the repo root on PYTHONPATH)."""

from __future__ import annotations

import time


def sleeps_then_raises(seconds: float = 4.0, **_: object) -> dict:
    """A mode whose load fails late: every job queued for it meanwhile fails
    at once when it does, so their replies leave the daemon in one burst."""
    time.sleep(seconds)
    raise RuntimeError("this loader fails on purpose, late")
