"""What each message from a worker means for its device.

Messages are handled in the loop's first phase, before commands and
deadlines, so a command sees the worker as it is now. A handler reads the
message and asks the device to act on it; when a message shows the worker
cannot go on (it broke the protocol), the device kills it and the loop's
end phase does the rest. A message from a worker that is not the device's
own now (an older generation) is logged and dropped, never attributed to
the new worker.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocol import (
    Chunk,
    Failure,
    Heartbeat,
    Hello,
    Kind,
    LoadFailed,
    ModeLoadError,
    OutOfMemory,
    ProtocolError,
    Ready,
    Result,
    error_from_wire,
)
from supervisor.engine.link import Received
from supervisor.engine.worker_handle import WorkerHandle, WorkerState

if TYPE_CHECKING:
    from supervisor.engine.device import Device

log = logging.getLogger("gpuvisor")

_OUTCOMES = (Kind.RESULT, Kind.FAILURE, Kind.CHUNK)


def handle(device: Device, got: Received) -> None:
    w = device.worker
    if w is not None and got.identity == w.heartbeat_identity:
        # A worker may send its heartbeats on a socket of their own (routing
        # id h<gen>), so a long handler on its main thread never delays them.
        if not w.alive:
            return
        if isinstance(got.message, Heartbeat):
            w.last_seen = device.clock()
            _on_heartbeat(device, w, got.message)
        else:
            log.warning("dropped a message on worker gen %d's heartbeat socket: only heartbeats go there", w.gen)
        return
    if w is None or got.identity != w.identity:
        log.warning(
            "dropped a message from %r: not the current worker (generation %s)", got.identity, w.gen if w else None
        )
        return
    if w.state is WorkerState.EXITED:
        if not w.in_flight:
            return
        device.heard_last_words()  # it died, but what it sent before still counts
    if got.message is None:
        _unreadable(device, w, got)
        return
    w.last_seen = device.clock()
    msg = got.message
    try:
        _HANDLERS[type(msg)](device, w, msg)  # type: ignore[operator]  # each handler takes its own kind
    except Exception as exc:  # noqa: BLE001 - the loop must outlive any one message
        log.exception("could not handle %s from worker gen %d", msg.kind.value, w.gen)
        if w.alive:
            device.kill(f"sent a {msg.kind.value} message the supervisor could not handle ({exc})")


def _unreadable(device: Device, w: WorkerHandle, got: Received) -> None:
    """A RESULT, FAILURE or CHUNK whose header names the running job but whose
    value cannot be read fails that job alone: the worker kept to the
    protocol otherwise and serves on. Anything else unreadable means our own
    child broke the protocol: whatever it was answering is lost, so it is
    killed, and the job it ran gets the ProtocolError."""
    job = w.in_flight[0] if w.in_flight else None
    problem = got.error.message if got.error is not None else "unreadable"
    if job is not None and got.kind in _OUTCOMES and got.job == job.id:
        w.last_seen = device.clock()
        log.error("worker gen %d sent a %s for job %d that cannot be read: %s", w.gen, got.kind, job.id, problem)
        error = ProtocolError(f"the worker's {got.kind} for job {job.id} ({job.task!r}) cannot be read: {problem}")
        if got.kind == Kind.CHUNK:  # the stream is broken: it ends now; the job's own outcome is still to come
            job.on_chunk, job.stream_broken = None, True
            device.parts.outcomes.add(job.future, error=error)
        else:
            _on_outcome(device, w, Failure(job.id, error.to_wire()))
        return
    log.error("worker gen %d sent a malformed message: %s", w.gen, got.error)
    if w.alive:
        device.kill(f"sent a malformed message ({got.error})", ProtocolError)


def _on_hello(device: Device, w: WorkerHandle, msg: Hello) -> None:
    if w.state is not WorkerState.SPAWNED or msg.gen != w.gen:
        log.warning("worker gen %d: unexpected HELLO (gen %d) in state %s", w.gen, msg.gen, w.state.value)
        return
    device.said_hello(w)


def _on_ready(device: Device, w: WorkerHandle, msg: Ready) -> None:
    if w.state is not WorkerState.LOADING or msg.mode != w.mode:
        log.warning("worker gen %d: unexpected READY for %r in state %s", w.gen, msg.mode, w.state.value)
        return
    device.switch_done(w, msg, _batch_limits(msg.batch))


def _batch_limits(declared: dict | None) -> dict[str, dict[str, float]]:
    """READY's ``batch``, the well-formed entries: task -> max_batch, max_delay_ms."""
    out = {}
    for task, limits in (declared or {}).items():
        size = limits.get("max_batch") if isinstance(limits, dict) else None
        delay = limits.get("max_delay_ms", 0.0) if isinstance(limits, dict) else None
        if isinstance(task, str) and type(size) is int and size >= 1 and isinstance(delay, (int, float)) and delay >= 0:
            out[task] = {"max_batch": size, "max_delay_ms": float(delay)}
        else:
            log.warning("ignored READY's batch entry for %r: %r", task, limits)
    return out


def _on_load_failed(device: Device, w: WorkerHandle, msg: LoadFailed) -> None:
    """The worker exits 3 by itself (a stop makes sure); the switch fails when
    it is reaped, without waiting here."""
    if w.state is not WorkerState.LOADING:
        log.warning("worker gen %d: unexpected LOAD_FAILED in state %s", w.gen, w.state.value)
        return
    remote = error_from_wire(msg.error)
    device.load_failed(ModeLoadError(f"loading mode {msg.mode!r} raised {remote.message}", **remote.details))


def _on_outcome(device: Device, w: WorkerHandle, msg: Result | Failure) -> None:
    job = w.in_flight[0] if w.in_flight else None
    if job is None or job.id != msg.job or w.state not in (WorkerState.BUSY, WorkerState.STOPPING, WorkerState.EXITED):
        log.warning("worker gen %d: dropped an outcome for job %d, which is not running", w.gen, msg.job)
        return
    error = error_from_wire(msg.error) if isinstance(msg, Failure) else None
    device.finished(w)
    if w.in_flight and w.in_flight[0].stopped:  # its caller left while it waited in the window: it starts now
        device.send_cancel(w.in_flight[0])
    outcome = (job.future, msg.value if isinstance(msg, Result) else None, error)
    if isinstance(error, OutOfMemory) and device.config.recycle_on_oom and w.alive:
        log.warning("job %d (%r) ran out of memory; recycling worker gen %d (recycle_on_oom)", job.id, job.task, w.gen)
        device.ran_out_of_memory(outcome)
        return
    device.parts.outcomes.add(outcome[0], result=outcome[1], error=outcome[2])


def _on_chunk(device: Device, w: WorkerHandle, msg: Chunk) -> None:
    job = w.in_flight[0] if w.in_flight else None
    if job is not None and job.id == msg.job and (job.stream_broken or job.stopped):
        return  # its reader already has its error, or has left
    if job is None or job.id != msg.job or job.on_chunk is None:
        log.warning("worker gen %d: dropped a chunk for job %d, which is not a stream in flight", w.gen, msg.job)
        return
    if msg.seq != job.chunks + 1:
        if w.alive:
            device.kill(f"sent chunk {msg.seq} of job {job.id} after chunk {job.chunks}", ProtocolError)
        return
    job.chunks = msg.seq
    try:
        job.on_chunk(msg.value)
    except Exception:  # noqa: BLE001 - a reader's failure is not the worker's
        log.exception("job %d: could not deliver chunk %d to its reader", job.id, msg.seq)


def _on_heartbeat(device: Device, w: WorkerHandle, msg: Heartbeat) -> None:
    device.heard_heartbeat(w, msg.memory)  # last_seen is already updated for every message


_HANDLERS = {
    Hello: _on_hello,
    Ready: _on_ready,
    LoadFailed: _on_load_failed,
    Result: _on_outcome,
    Chunk: _on_chunk,
    Failure: _on_outcome,
    Heartbeat: _on_heartbeat,
}
