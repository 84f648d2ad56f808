"""The CLI's long waits, told as they go: a switch or restart by its
phases, a stop by its drain, a job that waits behind a switch by what it
waits for, and ``gpuvisor events`` itself. Each reads the daemon's event
stream beside its request and shows it with ``progress.Progress``; the
request's own answer is what the command prints, as before."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from supervisor.service.progress import Progress, describe, jobs, waiting_for

if TYPE_CHECKING:
    from supervisor.client import Client
    from supervisor.events import EventStream

_TICK_S = 0.1  # how often a wait looks at its request between events
WAIT_BEFORE_SAYING_S = 1.0  # a job that has not ended by then says what it waits for


def _until_done(events: EventStream, future: Future, on_event: Callable[[dict], None]) -> None:
    """Every event until ``future`` is done, then those already in (the
    daemon sends a request's last events before its answer)."""
    while not future.done():
        event = events.next(timeout=_TICK_S)
        if event is not None:
            on_event(event)
    for event in events.take():
        on_event(event)


def switch(client: Client, mode: str | None, device: str | None, restart: bool) -> Any:
    """``switch`` / ``restart``: the result, each of its phases shown as it begins."""
    with client.events() as events, Progress() as progress:
        future = client.restart(mode, device=device) if restart else client.switch_mode(mode or "", device=device)

        def on_event(e: dict) -> None:
            if e.get("event") != "switch" or e.get("why") not in ("switch", "restart"):
                return
            if (restart and e["why"] != "restart") or (mode is not None and e.get("mode") != mode):
                return
            if device is None or e.get("device") in (None, device):
                progress.phase(describe(e))

        _until_done(events, future, on_event)
    return future.result()


def unload(client: Client, device: str | None) -> Any:
    """``unload``: the jobs in flight it waits for, then each worker's end."""
    with client.events() as events, Progress() as progress:
        busy = [d for d in client.status().get("devices", ()) if device in (None, d.get("name")) and d.get("in_flight")]
        future = client.unload(device)
        for d in busy:
            progress.phase(f"unloading: {d['in_flight']} job(s) in flight on {d['name']} finish first")

        def on_event(e: dict) -> None:
            if e.get("event") == "worker_ended" and device in (None, e.get("device")):
                progress.phase(describe(e))

        _until_done(events, future, on_event)
    return future.result()


def stop(client: Client, drain: bool, timeout: float | None) -> dict[str, Any]:
    """``stop``: the drain's jobs left as they go; returns what the stop did."""
    failure: list[BaseException] = []

    def shut() -> None:
        try:
            client.shutdown(drain=drain, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001 - raised on the main thread below
            failure.append(exc)

    stopped: dict[str, Any] = {}
    with client.events() as events, Progress() as progress:
        asking = threading.Thread(target=shut, name="gpuvisor-stop", daemon=True)
        asking.start()  # after the events request: the daemon takes them in order
        try:
            for e in events:
                if e.get("event") == "drain" and e.get("jobs_left") != stopped.get("jobs_left"):
                    stopped["jobs_left"] = e.get("jobs_left")
                    progress.phase(describe(e))
                elif e.get("event") == "stopped":
                    stopped.update(finished=e.get("finished"), cancelled=e.get("cancelled"))
        except Exception:  # noqa: BLE001 - the stream ends when the daemon goes; its end is shutdown()'s to tell
            pass
    asking.join()
    if failure:
        raise failure[0]
    stopped.pop("jobs_left", None)
    return {"stopped": True, **stopped}


def job(client: Client, future: Future, mode: str | None) -> Any:
    """A job's result; if it has not ended within a second, what it waits
    for (a switch's phase, or the jobs ahead of it), then each phase."""
    began = time.monotonic()
    try:
        return future.result(WAIT_BEFORE_SAYING_S)
    except TimeoutError:
        pass
    with client.events() as events, Progress() as progress:
        switches: dict[str, tuple[dict, float]] = {}  # device -> its switch's last event, when it came

        def on_event(e: dict) -> None:
            if e.get("event") != "switch":
                return
            key = str(e.get("device"))
            if e.get("phase") in ("ready", "failed"):
                if switches.pop(key, None) is not None:
                    progress.phase(describe(e))
                return
            switches[key] = (e, time.monotonic() - float(e.get("elapsed") or 0.0))
            if said:
                progress.phase(waiting_for(e), since=switches[key][1])

        said = False
        while not future.done():  # what is under way comes first: the stream starts with it
            e = events.next(timeout=0.2)
            if e is None:
                break
            on_event(e)
        if not future.done():
            ours = [s for s in switches.values() if mode is None or s[0].get("mode") == mode] or list(switches.values())
            if ours:
                progress.phase(waiting_for(ours[0][0]), since=ours[0][1])
            elif (ahead := _jobs_ahead(client, mode, time.monotonic() - began)) is not None:
                progress.phase(f"waiting: {jobs(ahead[0])} ahead for mode {ahead[1]!r}", since=began)
            said = True
            _until_done(events, future, on_event)
    return future.result()


def _jobs_ahead(client: Client, mode: str | None, age: float) -> tuple[int, str] | None:
    """How many jobs run or wait before a job of ``mode`` sent ``age``
    seconds ago, or None if it runs already: no job of its mode has waited
    that long, so it is not among those waiting (the status tells how long
    the oldest of each mode has waited, not whose it is)."""
    status = client.status()
    mode = mode or status.get("mode")
    waiting = (status.get("waiting") or {}).get(mode) if mode else None
    if not waiting or float(waiting.get("oldest_s") or 0.0) < age - 0.5:
        return None
    return max(0, int(status.get("queued", 0)) + int(status.get("in_flight", 0)) - 1), str(mode)


def events(client: Client, as_json: bool) -> None:
    """``gpuvisor events``: each event on stdout (a JSON line each with
    ``--json``) until the daemon stops or the reader interrupts."""
    with client.events() as stream:
        for e in stream:
            if as_json:
                print(json.dumps(e), flush=True)
            else:
                when = time.strftime("%H:%M:%S", time.localtime(float(e.get("t", 0))))
                print(f"{when} {describe(e)}", flush=True)
    print("gpuvisor: the daemon stopped", file=sys.stderr)
