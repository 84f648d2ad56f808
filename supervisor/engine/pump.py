"""The loop's placing phase: queued work goes to the devices as far as
their states allow, the device free the longest first. Placement's rules
(``placement``) say what each device does with the item the queue offers
it; this carries their answers out, and gathers batches.
"""

from __future__ import annotations

from protocol import NoModeLoaded
from protocol.messages import MAX_FRAMES
from supervisor.engine import placement
from supervisor.engine.commands import QueuedJob, QueuedSwitch
from supervisor.engine.deadlines import Deadline
from supervisor.engine.device import Device
from supervisor.engine.device_state import Parts
from supervisor.engine.placement import Move
from supervisor.engine.worker_handle import WorkerHandle, WorkerState


def place_and_dispatch(parts: Parts) -> None:
    for device in parts.devices:
        device.recycle_if_due()
    if parts.queue:  # a device takes work only from the queue: an empty one, nothing to place
        for device in placement.offer_order(parts.devices):
            _offer(parts, device)
    if parts.stopping and not parts.queue:
        for device in parts.devices:
            w = device.worker
            if device.switch is None and (w is None or not w.in_flight):
                device.drain()


def _offer(parts: Parts, device: Device) -> None:
    """Hand ``device`` what the queue gives it, until it must wait."""
    queue, outcomes, window = parts.queue, parts.outcomes, parts.settings.config.window
    while True:
        w = device.worker
        if device.switch is not None or device.recycle:
            return
        if w is not None and (w.state not in (WorkerState.READY, WorkerState.BUSY) or len(w.in_flight) >= window):
            return
        item = queue.next(device.mode, device.turn_since, device.may_run)
        if item is None:
            return
        target = None
        if isinstance(item, QueuedSwitch):  # a barrier is placed once: the device is recorded on it
            target = item.device = placement.switch_target(parts.settings.config, parts.devices, item)
        move = placement.move(
            device,
            item,
            target=target,
            worker_mode=w.mode if w is not None else None,
            in_flight=len(w.in_flight) if w is not None else 0,
            backing_off=device.backing_off,
        )
        if move is Move.WAIT:
            return
        if move is Move.BEGIN_BARRIER:
            assert isinstance(item, QueuedSwitch)
            if not device.answer_barrier(item):
                return
            continue
        assert isinstance(item, QueuedJob)
        if move is Move.NO_MODE:
            queue.take(item)
            why = f" ({device.mode_error})" if device.mode_error else ""
            outcomes.add(
                item.future,
                error=NoModeLoaded(
                    f"job {item.id} ({item.task!r}) names no mode and none is loaded{why}; pass mode= or call switch_mode()"
                ),
            )
            continue
        if move is Move.SWITCH_FOR_JOB:
            device.begin_switch(QueuedSwitch(item.mode or device.mode, None))
            return
        assert w is not None
        jobs = _batch(parts, item, w, device)
        if not jobs:
            return  # a batch waits a moment for more jobs, or for the worker to be idle
        for job in jobs:
            queue.take(job)
        if not device.dispatch(jobs, w):
            return


def _batch(parts: Parts, job: QueuedJob, w: WorkerHandle, device: Device) -> list[QueuedJob]:
    """What to hand ``w`` with ``job``: ``job`` alone, or, for a task whose
    handler takes a batch, the jobs right behind it for that task, up to
    ``max_batch``, once the worker is idle. A short batch waits up to
    ``max_delay_ms`` after its oldest job came, for more, when the last
    batch of its task held more than one job (callers send at once: the
    wait fills the batch); after a batch of one it goes at once (a
    caller that sends its next job when the last one answers would wait
    for nothing on every job). [] means wait."""
    limits = device.batch_limits(w, job)
    if limits is None:
        return [job]
    if w.in_flight:
        return []  # the jobs gather while the worker runs: the next batch is fuller
    key = device.key(Deadline.BATCH)
    size = int(limits["max_batch"])
    run = parts.queue.run_of(job, job.task, size, MAX_FRAMES - 1)
    due = job.queued_at + limits["max_delay_ms"] / 1000
    alone = device.last_batch.get((w.mode, job.task), 1) == 1
    if len(run) < size and not parts.stopping and not alone and parts.clock() < due:
        parts.deadlines.set(key, due)
        return []
    parts.deadlines.clear(key)
    return run
