"""The rules of the API's arguments, checked in the caller's thread when
the call is made, the same for every face: a ``Supervisor`` and a ``Client``
refuse the same arguments with the same ``TypeError`` or ``ValueError``,
before anything is queued or sent. Only what the arguments show by
themselves is checked here: whether a mode or a device exists is the
supervisor's configuration, and its answer comes through the Future."""

from __future__ import annotations

import math
from typing import Any


def check_mode(mode: Any, optional: bool) -> None:
    if (mode is None and optional) or isinstance(mode, str):
        return
    raise TypeError(f"mode must be a str{' or None' if optional else ''}, got {type(mode).__name__}")


def check_device(device: Any) -> None:
    if device is not None and not isinstance(device, str):
        raise TypeError(f"device must be a str or None, got {type(device).__name__}")


def check_seconds(name: str, value: Any, zero_means_none: bool = False) -> float | None:
    """Seconds as a float. A job's ``timeout=0`` means "no timeout", as
    ``job_timeout = 0`` does in the config; a bound on a wait must be > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if zero_means_none and value == 0:
        return 0.0
    least = ">= 0 (0: none)" if zero_means_none else "> 0"
    if not value > 0 or not math.isfinite(value):  # NaN compares False to everything
        raise ValueError(f"{name} must be a finite number {least}, got {value!r}")
    return float(value)


def check_submit(task: Any, mode: Any, timeout: Any, retries: Any, stream: Any, on_chunk: Any = None) -> float | None:
    """Every check of submit()'s arguments; returns the timeout as a float."""
    if not isinstance(task, str) or not task:
        raise TypeError(f"task must be a non-empty str, got {task!r}")
    check_mode(mode, optional=True)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise TypeError(f"retries must be a whole number >= 0, got {retries!r}")
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be a bool, got {type(stream).__name__}")
    if on_chunk is not None and (stream or not callable(on_chunk)):
        raise TypeError("on_chunk must be a callable, and is instead of stream=True, not with it")
    if (stream or on_chunk) and retries:
        raise ValueError("a streamed job cannot be retried: its reader would see the chunks twice")
    return check_seconds("timeout", timeout, zero_means_none=True)
