"""``diag``: tasks for tests and operators. Imports no torch, loads in
milliseconds, and can fail or die on request so every fault path can be
driven for real.

Its test hooks write where the caller says: a file (``count``'s
``record``, ``crash``'s ``once_file``), or the supervisor's log (``crash``'s
``say``, ``chatter``). The worker writes as the daemon's user, and a daemon
may serve this mode to every member of its ``socket_group``, so the hooks
are off unless the mode is loaded with ``args = { test_hooks = true }``;
without it a payload that asks for one is refused with a ``ValueError``
naming that argument, before anything is written."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

from worker.batching import batched


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


def chatter(payload: Any) -> dict:
    """Write to stderr without pause for ``seconds``: a noisy library, for
    the tests that the supervisor's loop never stalls on a worker's stderr
    and forwards no more of it than its budget. A test hook."""
    seconds = _payload_map(payload, "chatter").get("seconds", 1.0)
    line = b"chatter " * 16 + b"\n"
    end = time.monotonic() + seconds
    lines = 0
    while time.monotonic() < end:
        os.write(2, line * 64)
        lines += 64
    return {"lines": lines}


def count(payload: Any):
    """Stream ``0 .. n-1`` (a generator handler), ``delay`` seconds apart,
    and return ``{"count": n}``. ``die_after``: SIGKILL itself after that
    many chunks, to end a stream with a crash. ``record``: a file that gets
    a line per chunk as it is made, then ``closed`` when the generator ends
    however it ends (its ``finally``), so a test counts what the worker
    produced after its caller left. ``record`` is a test hook."""
    args = _payload_map(payload, "count")
    n, delay, die_after, record = args.get("n", 3), args.get("delay", 0), args.get("die_after"), args.get("record")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"count: 'n' must be a whole number >= 0, got {n!r}")
    if record is not None and not isinstance(record, str):
        raise ValueError(f"count: 'record' must be a file path, got {record!r}")
    try:
        for i in range(n):
            if i == die_after:
                _die("kill", 0)
            if record is not None:
                _note(record, str(i))
            yield i
            if delay:
                time.sleep(delay)
    finally:
        if record is not None:
            _note(record, "closed")
    return {"count": n}


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def oom(payload: Any) -> None:
    """Ask for more memory than exists: a real ``MemoryError`` from the
    allocator (no GPU needed), the host-side twin of CUDA's OOM."""
    size = _payload_map(payload, "oom").get("bytes", 1 << 62)
    bytearray(size)


def fail(payload: Any) -> None:
    message = _payload_map(payload, "fail").get("message", "diag.fail was asked to fail")
    raise RuntimeError(message)


@batched(max_batch=8, max_delay_ms=20)
def batch_echo(payloads: list) -> list:
    """A batch handler: each payload back with the size of the batch it ran
    in, so a test sees which jobs were run together."""
    return [{"payload": p, "batch": len(payloads)} for p in payloads]


@batched(max_batch=8, max_delay_ms=20)
def batch_sleep(payloads: list) -> list:
    """A batch that takes time: sleeps the longest ``seconds`` of its
    payloads, once, then answers like ``batch_echo``; so a batch can time
    out or be killed while it runs."""
    longest = max((_payload_map(p, "batch_sleep").get("seconds", 0) for p in payloads), default=0)
    if not isinstance(longest, (int, float)) or isinstance(longest, bool) or longest < 0:
        raise ValueError(f"batch_sleep: 'seconds' must be a number >= 0, got {longest!r}")
    time.sleep(longest)
    return [{"payload": p, "batch": len(payloads)} for p in payloads]


@batched(max_batch=8, max_delay_ms=20)
def batch_fail(payloads: list) -> list:
    raise RuntimeError("batch_fail on purpose")


_WAYS = ("exit", "segfault", "kill")


def _die(how: str, code: int) -> None:
    if how == "exit":
        os._exit(code)
    if how == "segfault":
        ctypes.string_at(0)
    os.kill(os.getpid(), signal.SIGKILL)


def crash(payload: Any) -> Any:
    """Die the way the payload says: ``how`` is ``exit`` (status ``code``,
    default 3), ``segfault`` (a real SIGSEGV from a null read) or ``kill``
    (SIGKILL). ``say``: a line to write to stderr first (last words for the
    crash report). ``after``: die that many seconds from now, from another
    thread, and answer at once (so the worker dies idle, or while draining,
    or while a switch waits). ``once_file``: die only if that file does not
    exist yet, creating it (a crash that a retry gets past). ``say`` and
    ``once_file`` are test hooks."""
    args = _payload_map(payload, "crash")
    how, code, after = args.get("how", "exit"), args.get("code", 3), args.get("after", 0)
    if how not in _WAYS:
        raise ValueError(f"crash: 'how' must be one of {_WAYS}, got {how!r}")
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        raise ValueError(f"crash: 'code' must be 0..255, got {code!r}")
    if not isinstance(after, (int, float)) or isinstance(after, bool) or after < 0:
        raise ValueError(f"crash: 'after' must be seconds >= 0, got {after!r}")
    once = args.get("once_file")
    if once is not None:
        try:
            open(once, "x").close()
        except FileExistsError:
            return "survived"
    if args.get("say"):
        print(str(args["say"]), file=sys.stderr, flush=True)
    if after:
        threading.Timer(after, _die, (how, code)).start()
        return {"dying_in": after}
    _die(how, code)
    return None


TEST_HOOKS: dict[str, dict[str | None, str]] = {
    "count": {"record": "appends to any file the worker's user may write"},
    "crash": {
        "once_file": "creates any file the worker's user may create",
        "say": "writes any text into the supervisor's log",
    },
    "chatter": {None: "floods the supervisor's log"},
}
"""The test hooks, by task: the payload key (None: the whole task) and what
it does that a caller must not be free to do."""


def _hooks_off(task: str, handler: Any, hooks: dict[str | None, str]) -> Any:
    """``handler``, refusing every payload that uses one of ``hooks``."""

    def refuse_test_hooks(payload: Any) -> Any:
        given = _payload_map(payload, task)
        for key, does in hooks.items():
            if key is None or key in given:
                what = task if key is None else f"{task}'s {key!r}"
                raise ValueError(
                    f"diag: {what} is a test hook (it {does}), and this diag mode was loaded without "
                    "test hooks: load it with args = { test_hooks = true } to use them"
                )
        return handler(payload)

    return refuse_test_hooks


def load(test_hooks: bool = False, **args: Any) -> dict:
    """The tasks. ``test_hooks``: let payloads use the test hooks (see the
    module's docstring); off by default, and so in the built-in config."""
    if args:
        raise TypeError(f"diag takes no arguments but 'test_hooks', got {sorted(args)}")
    if not isinstance(test_hooks, bool):
        raise TypeError(f"diag: 'test_hooks' must be true or false, got {test_hooks!r}")
    handlers = {
        "echo": echo,
        "sleep": sleep,
        "pid": pid,
        "fail": fail,
        "crash": crash,
        "chatter": chatter,
        "count": count,
        "oom": oom,
        "batch_echo": batch_echo,
        "batch_fail": batch_fail,
        "batch_sleep": batch_sleep,
    }
    if not test_hooks:
        for task, hooks in TEST_HOOKS.items():
            handlers[task] = _hooks_off(task, handlers[task], hooks)
    return handlers
