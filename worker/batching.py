"""Handlers that take a batch.

A GPU does one forward pass over 64 inputs in about the time it takes for
one, so a service whose callers each send one small input wastes most of
the device when it runs them one call each. ``@batched`` marks a handler
that takes a list of payloads and returns a list of results, one per
payload, in order: the supervisor then hands it the jobs waiting for its
task together (up to ``max_batch``, waiting at most ``max_delay_ms`` for
more to come), as TorchServe's ``batch_size`` / ``max_batch_delay`` and
Triton's dynamic batcher do, and each caller still gets its own result.

The mark is an attribute on the handler itself, not a wrapper, so the
handler stays the plain callable its author wrote (and tested); the worker
reads it once, when the mode has loaded, and lists it in READY.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

MAX_BATCH = 4096
"""The largest ``max_batch`` a handler may declare (the configuration's bound too)."""

_MARK = "gpuvisor_batch"

F = TypeVar("F", bound=Callable[..., Any])


def batched(max_batch: int = 64, max_delay_ms: float = 2.0) -> Callable[[F], F]:
    """Declare that the handler takes ``[payload, ...]`` and returns
    ``[result, ...]`` of the same length. ``max_batch``: the most payloads
    in one call; ``max_delay_ms``: how long the supervisor may hold a job
    back waiting for others to fill its batch (0: never wait, batch only
    what is already queued). If the handler raises, every job of the batch
    fails with that error; validate what you can before the costly part."""
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= MAX_BATCH:
        raise ValueError(f"batched: max_batch must be a whole number from 1 to {MAX_BATCH}, got {max_batch!r}")
    if not isinstance(max_delay_ms, (int, float)) or isinstance(max_delay_ms, bool) or not 0 <= max_delay_ms < math.inf:
        raise ValueError(f"batched: max_delay_ms must be a finite number >= 0, got {max_delay_ms!r}")
    limits = {"max_batch": max_batch, "max_delay_ms": float(max_delay_ms)}

    def mark(handler: F) -> F:
        if not callable(handler):
            raise TypeError(f"batched: {handler!r} is not callable")
        if inspect.isgeneratorfunction(handler) or inspect.isasyncgenfunction(handler):
            raise TypeError(f"batched: {handler.__qualname__} is a generator; a batch handler returns a list")
        setattr(handler, _MARK, dict(limits))
        return handler

    return mark


def batch_limits(handler: Any) -> dict[str, Any] | None:
    """``{"max_batch", "max_delay_ms"}`` if ``handler`` was declared with
    ``@batched``, else None."""
    limits = getattr(handler, _MARK, None)
    return dict(limits) if isinstance(limits, dict) else None
