"""Placement: which device runs what, as pure rules.

Each function reads views of the devices (``DeviceView``: what a device
shows of itself), the queue's item and the configuration, changes nothing,
and returns a decision that the loop carries out. So every rule can be
tested without a worker (``tests/test_placement.py``).

The order devices are offered work: free before busy, holding no mode
before holding one (whose mode would be evicted), then free the longest.
A device may run a mode it holds, or one that allows it (``devices``) and
holds fewer devices than its ``replicas``; never a mode broken there.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol

from supervisor.config import Config
from supervisor.engine.commands import QueuedJob, QueuedSwitch


class BreakersView(Protocol):
    def broken(self, mode: str | None) -> bool: ...


class DeviceView(Protocol):
    """What placement reads of a device."""

    @property
    def name(self) -> str: ...

    @property
    def mode(self) -> str | None: ...  # the mode in force

    @property
    def mode_ahead(self) -> str | None: ...  # the mode the next job finds (the switch under way's)

    @property
    def mode_since(self) -> float: ...  # when the mode ahead was last put in force

    @property
    def free_since(self) -> float: ...

    @property
    def refused(self) -> dict[str, float]: ...  # modes it failed to load while another held them: until when

    @property
    def breakers(self) -> BreakersView: ...

    def busy(self) -> bool: ...

    def failed_reason(self) -> str | None: ...


def allows(config: Config, mode: str | None, device: DeviceView) -> bool:
    """``mode``'s ``devices`` include ``device`` (a mode not configured: any)."""
    spec = config.mode(mode) if mode is not None else None
    return spec is None or spec.allows(device.name)


def may_run(config: Config, devices: Sequence[DeviceView], device: DeviceView, mode: str | None, now: float) -> bool:
    """``device`` may run jobs of ``mode`` now: the mode allows the device,
    it is not broken there, and the device holds it already or the mode
    holds fewer devices than its ``replicas``."""
    if device.breakers.broken(mode) or not allows(config, mode, device):
        return False
    spec = config.mode(mode) if mode is not None else None
    if spec is None or mode == device.mode_ahead:
        return True
    if device.refused.get(spec.name, 0.0) > now:
        return False
    holders = sum(
        1
        for d in devices
        if d is not device and d.mode_ahead == mode and not d.breakers.broken(mode) and spec.allows(d.name)
    )
    return holders < spec.replicas


def can_serve(config: Config, devices: Sequence[DeviceView], mode: str | None) -> bool:
    """Some device where ``mode`` is not broken may run its jobs (now or
    once another mode's turn ends)."""
    return any(not d.breakers.broken(mode) and allows(config, mode, d) for d in devices)


def held_elsewhere(devices: Sequence[DeviceView], device: DeviceView, mode: str) -> bool:
    """Another device holds ``mode``, unbroken: its jobs can go there."""
    return any(d is not device and d.mode_ahead == mode and not d.breakers.broken(mode) for d in devices)


def free_longest(device: DeviceView) -> tuple[bool, bool, float]:
    """Placement's order: free devices before busy ones, a device holding no
    mode before one whose mode would be evicted, then the longest free."""
    return (device.busy(), device.mode_ahead is not None, device.free_since)


def offer_order(devices: Sequence[DeviceView]) -> list:
    """The order devices are offered work: a job whose mode no device holds
    goes to the one free the longest."""
    return sorted(devices, key=free_longest)


def mode_in_force(devices: Sequence[DeviceView]) -> str | None:
    """The mode a job that names none runs in, when nothing queued names
    one: the mode most recently put in force on any device."""
    return max(devices, key=lambda d: d.mode_since).mode_ahead


def switch_target(config: Config, devices: Sequence[DeviceView], switch: QueuedSwitch) -> str:
    """The device an explicit switch or restart applies to: the one it
    names; else, for a switch, a device that holds its mode (the switch is
    then a no-op) or the mode may use, the least busy and longest free; for
    a restart of no mode, a failed device first, then the one holding the
    mode in force. The loop records the answer on the switch, so it is
    decided once."""
    if switch.device is not None:
        return switch.device
    allowed = [d for d in devices if allows(config, switch.mode, d)]
    failed = [d for d in allowed if d.failed_reason()] if switch.restart else []
    wanted = switch.mode if switch.mode is not None or not switch.restart else mode_in_force(devices)
    holders = [
        d
        for d in allowed
        if d.mode_ahead is not None
        and not d.breakers.broken(d.mode_ahead)
        and (d.mode_ahead == wanted or (switch.restart and switch.mode is None))
    ]
    holders.sort(key=lambda d: (d.mode_ahead != wanted, free_longest(d)))
    target = min(failed, key=free_longest) if failed else holders[0] if holders else None
    return (target or min(allowed or devices, key=free_longest)).name


def puts_in_force(switch: QueuedSwitch, device: DeviceView) -> bool:
    """Whether beginning ``switch`` on ``device`` puts a mode in force for the
    jobs that name none: an explicit switch does, and so does one to a new
    mode; a respawn of the mode in force (after a death, an idle unload)
    or a reload of it does not."""
    return switch.future is not None or switch.mode != device.mode


class Move(enum.Enum):
    """What a device does with the item the queue offers it."""

    WAIT = "wait"  # nothing more for this device this turn
    BEGIN_BARRIER = "begin barrier"  # an explicit switch or restart for this device
    NO_MODE = "no mode"  # a job that names no mode where none is in force: it fails
    SWITCH_FOR_JOB = "switch for job"  # a job for a mode the worker does not hold
    HAND_OVER = "hand over"  # a job for the worker as it is


def move(
    device: DeviceView,
    item: QueuedJob | QueuedSwitch,
    *,
    target: str | None,
    worker_mode: str | None,
    in_flight: int,
    backing_off: Callable[[str], bool],
) -> Move:
    """The move for ``item`` on ``device``, whose worker (if any) holds
    ``worker_mode`` with ``in_flight`` jobs handed to it: a barrier waits
    for the device it is for (``target``), and nothing behind it runs
    anywhere before it; a barrier or a job for another mode waits for what
    is in flight; a respawn waits out its backoff."""
    if isinstance(item, QueuedSwitch):
        if target != device.name or in_flight:
            return Move.WAIT
        return Move.BEGIN_BARRIER
    if in_flight and item.mode not in (None, worker_mode):
        return Move.WAIT
    needed = item.mode or device.mode
    if needed is None:
        return Move.NO_MODE
    if worker_mode != needed:
        if worker_mode is None and needed == device.mode and backing_off(needed):
            return Move.WAIT
        return Move.SWITCH_FOR_JOB
    return Move.HAND_OVER
