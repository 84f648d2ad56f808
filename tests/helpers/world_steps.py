"""Steps the engine's unit tests take again and again, on top of
``FakeWorld`` (``tests/helpers/fake_world.py``): a mode brought up on a
device, the jobs a worker was sent, answered in order."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from protocol import Job
from protocol.messages import JobBatch
from tests.helpers.fake_world import Device, FakeWorld


def loaded(world: FakeWorld, mode: str, device: Device = 0, **ready: Any) -> Future:
    """``mode`` switched to on ``device`` and its worker READY (``ready``:
    what READY says, e.g. ``batch=``); the switch's Future, answered."""
    switched = world.switch(mode, device=world.device(device)["name"])
    world.worker_says_ready(device, **ready)
    assert switched.done(), f"the switch to {mode!r} on {device!r} is not answered: {world.device(device)}"
    return switched


def payloads(world: FakeWorld, device: Device = 0) -> list[Any]:
    """The payloads of the jobs sent to the device's worker, in order (a
    batch's one by one)."""
    out: list[Any] = []
    for msg in world.sent(device):
        if isinstance(msg, Job):
            out.append(msg.payload)
        elif isinstance(msg, JobBatch):
            out.extend(job.payload for job in msg.jobs)
    return out


def answer_all(world: FakeWorld, device: Device = 0) -> None:
    """The device's worker answers every job it has been sent and not yet
    answered, in order, each with its payload as its result (as ``echo``
    does); the jobs the engine sends meanwhile are answered too."""
    while True:
        sent = dict(zip(world.jobs_sent(device), payloads(world, device), strict=True))
        try:
            job = world.running(device)
        except AssertionError:
            return  # nothing left unanswered
        world.finish_job(device, value=sent[job], job=job)


def batches(world: FakeWorld, device: Device = 0) -> list[list[Any]]:
    """The payloads the device's worker was sent, one list per message: a
    lone job's ``[payload]``, a batch's every payload."""
    out: list[list[Any]] = []
    for msg in world.sent(device):
        if isinstance(msg, Job):
            out.append([msg.payload])
        elif isinstance(msg, JobBatch):
            out.append([job.payload for job in msg.jobs])
    return out
