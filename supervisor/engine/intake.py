"""What each command from an API thread means: a job or a switch joins the
queue (or is answered at once), a cancel, an unload, a reload, a new
follower, a shutdown. Taken in the loop's command phase, after what the
workers sent, so a command sees each worker as it is now."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from protocol import GpuvisorError, ShuttingDown
from supervisor.engine import placement
from supervisor.engine.commands import CancelJob, Command, Follow, QueuedJob, QueuedSwitch, Reload, Shutdown, Unload
from supervisor.engine.device import Device
from supervisor.engine.device_state import Parts
from supervisor.engine.outcomes import SPARES_REAPED
from supervisor.engine.stopping import Stopping
from supervisor.events import Subscription, event
from supervisor.futures import settle
from supervisor.status import already_loaded

log = logging.getLogger("gpuvisor")


def take(parts: Parts, stopping: Stopping, command: Command, status: Mapping[str, Any]) -> None:
    """``status``: the last one published (what a new follower is told first)."""
    config, devices, queue = parts.settings.config, parts.devices, parts.queue
    in_force = placement.mode_in_force(devices)
    if isinstance(command, Follow):  # taken while shutting down too: a drain is worth following
        _follow(parts, stopping, command.subscription, status)
    elif isinstance(command, Shutdown):
        stopping.begin(command)
    elif isinstance(command, Reload):
        _reload(parts, command)
    elif isinstance(command, CancelJob):  # taken while shutting down too: a caller may still leave
        parts.outcomes.add(command.future, result=_holder(devices, command.target).cancel(command.target))
    elif parts.stopping:
        refuse(command)
    elif isinstance(command, Unload):
        next(d for d in devices if d.name == command.device).unload(command.future)
    elif (
        isinstance(command, QueuedJob)
        and not queue.barrier_queued()
        and not placement.can_serve(config, devices, mode := command.mode or in_force)
    ):
        parts.outcomes.add(command.future, error=_broken_error(devices, mode))
    elif isinstance(command, QueuedSwitch) and (holder := _switch_is_noop(parts, command)) is not None:
        holder.put_in_force()  # the caller's word: its next jobs want this mode
        w = holder.taking_jobs()
        assert w is not None
        parts.outcomes.add(command.future, result=already_loaded(w.mode, w.pid))
    else:
        if isinstance(command, QueuedSwitch) or parts.followers:  # a switch's wait is logged too
            _tell_waiting(parts, command)
        queue.append(command, mode_in_force=in_force)


def refuse(command: Command) -> None:
    """A command that came too late: the supervisor stops, or has stopped."""
    if isinstance(command, Follow):
        command.subscription.put(event("stopped", finished=0, cancelled=0, seconds=0.0))
        command.subscription.close()
    elif isinstance(command, Shutdown):
        settle(command.future, result=None)
    elif command.future is not None:
        settle(command.future, error=ShuttingDown("the supervisor is shut down; it accepts no new work"))


def _holder(devices: list[Device], future: Any) -> Device:
    """The device whose worker holds the job of ``future``, else the first
    (a queued job is cancelled in the queue, whichever device asks)."""
    for device in devices:
        w = device.worker
        if w is not None and any(j.future is future for j in w.in_flight):
            return device
    return devices[0]


def _broken_error(devices: list[Device], mode: str | None) -> GpuvisorError:
    """Why no device may run ``mode``'s jobs: it is broken on each that
    could (the one tried again soonest speaks)."""
    broken = [d for d in devices if mode is not None and d.breakers.broken(mode)]
    if not broken or mode is None:
        return GpuvisorError("no device may run this job")
    return min((d.broken_error(mode) for d in broken), key=lambda e: float("inf") if e.retry_in is None else e.retry_in)


def _switch_is_noop(parts: Parts, switch: QueuedSwitch) -> Device | None:
    """The device, if this switch, placed at the tail, would change nothing:
    its mode is loaded (on the device it names, if it names one) and nothing
    queued or under way can change it first. A restart always changes
    something."""
    if switch.restart or switch.mode is None or not parts.queue.all_in(switch.mode):
        return None
    for device in parts.devices:
        w = device.taking_jobs()
        if w is not None and w.mode == switch.mode and switch.device in (None, device.name):
            return device
    return None


def _reload(parts: Parts, command: Reload) -> None:
    settings = parts.settings
    old, settings.config = settings.config, command.config
    command.swapped.set()
    log.info("configuration reloaded from %s: modes %s", command.config.source, sorted(command.config.modes))
    if command.config.device_settings() != old.device_settings():
        log.warning("device changes take effect when the supervisor restarts; keeping %r", old.device_settings())
    for device in parts.devices:
        device.reconfigure(old)
    parts.outcomes.hold(SPARES_REAPED, command.future)  # once the spares it stopped are reaped


def _follow(parts: Parts, stopping: Stopping, sub: Subscription, status: Mapping[str, Any]) -> None:
    """A new follower gets what is under way first: where each device
    stands, the phase of each switch, the drain."""
    devices = [
        {"name": d.name, "mode": s["mode"], "worker_pid": s["worker_pid"], "switching_to": s["switching_to"]}
        for d, s in zip(parts.devices, status.get("devices") or [], strict=False)
    ]
    sub.put(
        event(
            "following", state=status["state"], queued=len(parts.queue), in_flight=status["in_flight"], devices=devices
        )
    )
    followers = parts.followers
    followers.subscriptions.append(sub)
    others = followers.only(sub)  # the state now, to the new follower alone
    try:
        for device in parts.devices:
            if device.switch is not None:
                device.tell_switch(device.switch, device.switch_phase())
        stopping.progress(again=True)
    finally:
        followers.restore(others)


def _tell_waiting(parts: Parts, command: QueuedJob | QueuedSwitch) -> None:
    """Work queued behind a switch: how much is ahead of it, and which
    switch it waits for (a follower's ``submit`` shows it)."""
    queue, devices = parts.queue, parts.devices
    ahead = len(queue) + sum(len(d.worker.in_flight) for d in devices if d.worker is not None)
    switching = [
        {"device": d.name, "mode": d.switch.mode, "phase": d.switch_phase()} for d in devices if d.switch is not None
    ]
    if isinstance(command, QueuedSwitch):
        if ahead or switching:
            why = "restart" if command.restart else "switch"
            log.info(
                "%s to mode %r queued behind %d jobs%s",
                why,
                command.mode,
                ahead,
                "".join(f" and the switch to {s['mode']!r} on {s['device']}" for s in switching),
            )
            parts.followers.tell(
                "switch",
                phase="queued",
                mode=command.mode,
                device=command.device,
                why=why,
                ahead=ahead,
                switching=switching,
            )
    elif switching or queue.barrier_queued():
        parts.followers.tell(
            "job_waiting", job=command.id, task=command.task, mode=command.mode, ahead=ahead, switching=switching
        )
