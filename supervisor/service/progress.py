"""What the CLI shows while it waits on the daemon: a line per phase of a
switch, a drain's jobs left, what a job waits for. On a terminal the
current line is live, its elapsed time ticking (``rich``); in a pipe each
phase is one plain line as it begins. Always on stderr: stdout keeps the
command's result, as it was, with ``--json`` or without."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

_WAITING = {
    "queued": "queued behind other work",
    "stop": "stopping the worker before it",
    "reclaim": "waiting for the memory of the worker before it",
    "spawn": "starting",
    "load": "loading",
}


def jobs(count: Any) -> str:
    return f"{count} job{'' if count == 1 else 's'}"


def seconds_text(seconds: Any) -> str:
    return f"{seconds:.2f} s" if isinstance(seconds, (int, float)) else "-"


def _switch(e: dict) -> str:
    what = f"{'restart' if e.get('why') == 'restart' else 'switch'} to mode {e.get('mode')!r}"
    what += f" on {e['device']}" if e.get("device") else ""
    phase = e.get("phase")
    if phase == "queued":
        return f"{what}: queued behind {jobs(e.get('ahead'))}"
    if phase == "stop":
        return f"{what}: stopping worker pid {e.get('pid')} (mode {e.get('previous')!r})"
    if phase == "reclaim":
        return f"{what}: worker pid {e.get('pid')} stopped in {seconds_text(e.get('stop_seconds'))}; waiting for its memory"
    if phase == "spawn":
        return f"{what}: starting worker pid {e.get('pid')}{' (the warm standby)' if e.get('standby') else ''}"
    if phase == "load":
        return f"{what}: loading (worker pid {e.get('pid')} up in {seconds_text(e.get('spawn_seconds'))})"
    if phase == "ready":
        warm = f", warm-up {seconds_text(e['warmup_seconds'])}" if e.get("warmup_seconds") is not None else ""
        return f"{what}: ready in {seconds_text(e.get('seconds'))} (load {seconds_text(e.get('load_seconds'))}{warm}), pid {e.get('pid')}"
    if phase == "failed":
        return f"{what}: failed: {e.get('error')}"
    return f"{what}: {phase}"


def describe(e: dict) -> str:
    """One event in words."""
    kind = e.get("event")
    if kind == "switch":
        return _switch(e)
    if kind == "worker_started":
        return f"worker pid {e.get('pid')} started for mode {e.get('mode')!r} on {e.get('device')}"
    if kind == "worker_ended":
        return f"worker pid {e.get('pid')} (mode {e.get('mode')!r}) on {e.get('device')} ended: {e.get('why')}"
    if kind == "drain":
        return f"draining: {jobs(e.get('jobs_left'))} left ({e.get('queued')} queued, {e.get('in_flight')} running)"
    if kind == "stopped":
        return f"stopped: {jobs(e.get('finished'))} finished, {e.get('cancelled')} cancelled"
    if kind == "job_waiting":
        return f"job {e.get('job')} ({e.get('task')!r}) waits behind a switch, {jobs(e.get('ahead'))} ahead"
    if kind == "following":
        return f"following: {e.get('state')}, {e.get('queued')} queued, {e.get('in_flight')} running"
    if kind == "dropped":
        return f"{e.get('count')} events dropped: this reader fell behind"
    return str(e)


def waiting_for(e: dict) -> str:
    """What a job behind the switch ``e`` waits for."""
    doing = _WAITING.get(str(e.get("phase")), str(e.get("phase")))
    return f"waiting: mode {e.get('mode')!r} is {doing}" + (f" on {e['device']}" if e.get("device") else "")


class Progress:
    """Phase lines on ``stream``: live (the current one ticking) on a
    terminal, one plain line each in a pipe."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream or sys.stderr
        self._lines: list[tuple[str, float, float | None]] = []  # text, began, ended
        self._live: Any = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self, console=Console(file=self.stream), refresh_per_second=8, transient=False)
            self._live.start()

    def phase(self, text: str, since: float | None = None) -> None:
        """A new line; the one before it is over. ``since``: when what it
        says began (monotonic), if before now."""
        now = time.monotonic()
        if self._lines and self._lines[-1][0] == text:
            return  # the same words again (a phase told twice): the line already there goes on
        if self._lines and self._lines[-1][2] is None:
            last, began, _ = self._lines[-1]
            self._lines[-1] = (last, began, now)
        if self._live is None:
            print(text, file=self.stream, flush=True)
        self._lines.append((text, now if since is None else since, None))

    def close(self) -> None:
        if self._lines and self._lines[-1][2] is None:
            text, began, _ = self._lines[-1]
            self._lines[-1] = (text, began, time.monotonic())
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __rich__(self) -> Any:
        from rich.text import Text

        now = time.monotonic()
        text = Text()
        for n, (line, began, ended) in enumerate(self._lines):
            text.append(("\n" if n else "") + line)
            text.append(f"  {(ended or now) - began:.1f} s", style="dim" if ended else "bold")
        return text
