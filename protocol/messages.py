"""Supervisor <-> worker messages: kinds, typed objects, encode and decode.

A message is a ZeroMQ multipart message whose first frame is a msgpack map
``{"v": PROTOCOL_VERSION, "k": <kind>, ...fields}``. Later frames, if any, hold
the bytes of arrays the header refers to (see ``protocol.arrays``).
``docs/protocol.md`` is the contract; this module is its one implementation.

Decoding is typed and per direction: ``decode_from_worker`` only accepts what a
worker may send and ``decode_to_worker`` what a supervisor may send, so a
message in the wrong direction is a ``ProtocolError`` like any other malformed
input, never a ``KeyError`` from deep inside the loop. Nothing is pickled:
msgpack has no code-execution path, and the only ext type accepted is the
array reference.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from protocol.errors import ProtocolError
from protocol.packing import MAX_FRAMES as MAX_FRAMES  # the engine imports it from here
from protocol.packing import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Container,
    PackedPayload,
    check_version,
    pack_frames,
    pack_packed,
    unpack,
    unpack_map,
    unpack_map_packed,
)
from protocol.packing import peek as peek  # the engine, the client and the tests import it from here


class Kind(enum.StrEnum):
    """Message kinds; the values go on the wire as they are."""

    # worker -> supervisor
    HELLO = "hello"
    READY = "ready"
    LOAD_FAILED = "load_failed"
    RESULT = "result"
    CHUNK = "chunk"
    FAILURE = "failure"
    HEARTBEAT = "heartbeat"
    # supervisor -> worker
    LOAD = "load"
    JOB = "job"
    BATCH = "batch"
    DRAIN = "drain"
    CANCEL = "cancel"


class WorkerExit(enum.IntEnum):
    """The worker's exit statuses that mean something; any other is a crash."""

    DRAINED = 0  # after DRAIN
    LOAD_FAILED = 3  # after LOAD_FAILED
    DISCONNECTED = 4  # the supervisor's socket dropped the connection (e.g. a frame over the limit)
    ORPHANED = 70  # the supervisor is gone


EXIT_MEANINGS = {
    WorkerExit.LOAD_FAILED: "its mode failed to load",
    WorkerExit.DISCONNECTED: "it lost its connection to the supervisor; did it send a frame over the size limit?",
    WorkerExit.ORPHANED: "it found its supervisor gone",
}


class _Any:
    """Field type marker: any msgpack value."""


class _Optional:
    """Field marker: ``(name, type, _Optional)`` may be absent (or nil) and
    then takes the dataclass default. Fields added after version 1 are
    optional, so a worker written against the first contract still works."""


W = TypeVar("W", bound="_Message")
_WIRE_TYPES: dict[str, type] = {t.__name__: t for t in (int, float, str, bool, list, dict)} | {"Any": _Any}


def _wire(cls: type[W]) -> type[W]:
    """The message's fields as the decoder checks them, read off the
    dataclass once: ``(name, accepted type[, _Optional])``. A field that may
    be nil, or that defaults to False, is optional on the wire (added after
    version 1, or a flag); one with a default factory is required. An
    ``int`` field refuses ``bool`` (msgpack keeps them apart, Python does
    not)."""
    spec = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        names = [name.strip() for name in str(f.type).split("|")]
        wire = _WIRE_TYPES[next(name for name in names if name != "None")]
        spec.append((f.name, wire, _Optional) if "None" in names or f.default is False else (f.name, wire))
    cls.fields = tuple(spec)
    return cls


class _Message:
    """What every message class has: its kind, and its fields as the decoder
    checks them (set by ``_wire``)."""

    __slots__ = ()
    kind: ClassVar[Kind]
    fields: ClassVar[tuple] = ()


@_wire
@dataclass(frozen=True, slots=True)
class Hello(_Message):
    """First message of a worker: who it is, so stale generations are spotted."""

    kind: ClassVar[Kind] = Kind.HELLO
    pid: int
    gen: int


@_wire
@dataclass(frozen=True, slots=True)
class Ready(_Message):
    kind: ClassVar[Kind] = Kind.READY
    mode: str
    load_seconds: float
    tasks: list
    warmup_seconds: float | None = None
    memory: dict | None = None  # torch's own figures, see worker.memory
    imported: list | None = None  # heavy libraries the mode imported: what a warm standby should preload
    batch: dict | None = None  # task -> {"max_batch", "max_delay_ms"}: tasks whose handler takes a batch


@_wire
@dataclass(frozen=True, slots=True)
class LoadFailed(_Message):
    kind: ClassVar[Kind] = Kind.LOAD_FAILED
    mode: str
    error: dict


@_wire
@dataclass(frozen=True, slots=True)
class Result(_Message):
    kind: ClassVar[Kind] = Kind.RESULT
    job: int
    value: Any


@_wire
@dataclass(frozen=True, slots=True)
class Failure(_Message):
    kind: ClassVar[Kind] = Kind.FAILURE
    job: int
    error: dict


@_wire
@dataclass(frozen=True, slots=True)
class Chunk(_Message):
    """One streamed piece of a job's result, before its RESULT or FAILURE."""

    kind: ClassVar[Kind] = Kind.CHUNK
    job: int
    seq: int
    value: Any


@_wire
@dataclass(frozen=True, slots=True)
class Heartbeat(_Message):
    """Alive, and torch's memory figures when it has them. (A version-1
    worker also sends ``busy``: the decoder reads only these fields, so it
    is ignored; the supervisor knows what runs from its own books.)"""

    kind: ClassVar[Kind] = Kind.HEARTBEAT
    memory: dict | None = None


@_wire
@dataclass(frozen=True, slots=True)
class Load(_Message):
    kind: ClassVar[Kind] = Kind.LOAD
    mode: str
    loader: str
    args: dict = field(default_factory=dict)
    warmup: dict | None = None  # {"task", "payload"}: run once after the load, before READY
    path: list | None = None  # folders to import the loader from, ahead of the worker's own sys.path


@_wire
@dataclass(frozen=True, slots=True)
class Job(_Message):
    kind: ClassVar[Kind] = Kind.JOB
    job: int
    task: str
    payload: Any
    stream: bool = False  # send CHUNKs as a generator handler yields them


@_wire
@dataclass(frozen=True, slots=True)
class Drain(_Message):
    """Finish what you have, then exit 0."""

    kind: ClassVar[Kind] = Kind.DRAIN


@_wire
@dataclass(frozen=True, slots=True)
class Cancel(_Message):
    """Stop the streamed job ``job`` at its next chunk: its caller left. A
    worker that is not running that job (it has answered it, or not begun
    it) ignores this; one that does closes the generator and answers
    ``job_cancelled``."""

    kind: ClassVar[Kind] = Kind.CANCEL
    job: int


@_wire
@dataclass(frozen=True, slots=True)
class Batch(_Message):
    """Several JOB messages of one task, sent as one message: this header,
    then each job's own frames (its header and its arrays), ``counts[i]``
    frames for the i-th. A worker runs them as one call of a handler that
    takes a batch, and answers each job on its own."""

    kind: ClassVar[Kind] = Kind.BATCH
    task: str
    counts: list


@dataclass(frozen=True, slots=True)
class JobBatch:
    """A decoded BATCH: its jobs, in order, each a ``Job`` of ``task``."""

    task: str
    jobs: list[Job]


FromWorker = Hello | Ready | LoadFailed | Result | Chunk | Failure | Heartbeat
ToWorker = Load | Job | JobBatch | Drain | Cancel

_FROM_WORKER: dict[str, Any] = {c.kind.value: c for c in (Hello, Ready, LoadFailed, Result, Chunk, Failure, Heartbeat)}
_TO_WORKER: dict[str, Any] = {c.kind.value: c for c in (Load, Job, Drain, Cancel)}


def encode(msg: _Message, limit: int = MAX_MESSAGE_BYTES) -> list:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": msg.kind.value}
    for name, _type, *optional in msg.fields:
        value = getattr(msg, name)
        if not optional or (value is not None and value is not False):
            header[name] = value
    return pack_frames(header, limit, f"{msg.kind.value} message")


def encode_job(job_id: int, task: str, payload: Any, stream: bool = False, limit: int = MAX_MESSAGE_BYTES) -> list:
    """A JOB message, encoded once by the submitting thread so that a payload
    msgpack cannot carry, or one over the limit, fails at ``submit()``. A
    ``PackedPayload`` goes in as the bytes it is."""
    if not isinstance(payload, PackedPayload):
        return encode(Job(job_id, task, payload, stream), limit)
    head = {"v": PROTOCOL_VERSION, "k": Kind.JOB.value, "job": job_id, "task": task}
    if stream:
        head["stream"] = True
    return pack_packed(head, "payload", payload, limit, "job message")


def encode_batch(task: str, jobs: list[list]) -> list:
    """A BATCH of ``jobs``, each the frames of an encoded JOB of ``task``:
    put together, not encoded again (their arrays are not copied)."""
    header = encode(Batch(task, [len(frames) for frames in jobs]))
    return [*header, *(frame for frames in jobs for frame in frames)]


def _type_ok(value: Any, expected: type) -> bool:
    if isinstance(value, Container):
        return False
    if expected is _Any:
        return True
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def _decode(frames: list, table: dict[str, Any], direction: str, limit: int, packed: str | None = None) -> Any:
    header = unpack_map(frames, limit) if packed is None else unpack_map_packed(frames, limit, packed)
    check_version(header)
    kind = header.get("k")
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message kind {kind!r} {direction}")
    values = []
    for name, expected, *optional in cls.fields:
        if optional and header.get(name) is None:
            values.append(cls.__dataclass_fields__[name].default)
            continue
        if name not in header:
            raise ProtocolError(f"{kind} message lacks field {name!r}")
        value = header[name]
        if not _type_ok(value, expected):
            raise ProtocolError(
                f"{kind}.{name} is {type(value).__name__}, expected {expected.__name__.lstrip('_').lower()}"
            )
        values.append(value)
    return cls(*values)


def decode_from_worker(frames: list, limit: int = MAX_MESSAGE_BYTES, packed_value: bool = False) -> FromWorker:
    """``packed_value``: a RESULT's or CHUNK's ``value`` stays the msgpack it
    came as (a ``PackedPayload``), for a daemon that forwards it to its
    client without decoding it."""
    return _decode(frames, _FROM_WORKER, "from a worker", limit, "value" if packed_value else None)


def _decode_batch(frames: list, limit: int) -> JobBatch:
    header = _decode(frames[:1], {Kind.BATCH.value: Batch}, "to a worker", limit)
    counts = header.counts
    if not counts or not all(type(n) is int and n >= 1 for n in counts) or sum(counts) != len(frames) - 1:
        raise ProtocolError(f"batch.counts {counts!r} does not split the {len(frames) - 1} frames after the header")
    jobs, start = [], 1
    for n in counts:
        job = _decode(frames[start : start + n], {Kind.JOB.value: Job}, "inside a batch", limit)
        if job.task != header.task or job.stream:
            raise ProtocolError(f"a batch of {header.task!r} holds job {job.job} of {job.task!r} (or a stream)")
        jobs.append(job)
        start += n
    return JobBatch(header.task, jobs)


def decode_to_worker(frames: list, limit: int = MAX_MESSAGE_BYTES) -> ToWorker:
    # A batch holds at least one job after its header, so a lone frame (most
    # jobs) skips the peek, which costs a third of decoding a small job.
    if len(frames) > 1 and peek(frames, "k") == Kind.BATCH:
        return _decode_batch(frames, limit)
    return _decode(frames, _TO_WORKER, "to a worker", limit)


def job_ids_of(frames: list) -> list[int]:
    """The job ids a message the decoder refused still names: a JOB's, or
    those of each job of a BATCH (its header's ``counts`` say where each
    job's header frame is; if they cannot be read, every frame is tried)."""
    kind = peek(frames, "k")
    if kind == "job":
        headers = [frames[0]]
    elif kind == "batch":
        headers = list(frames[1:])
        try:
            counts = unpack(bytes(frames[0])).get("counts")
        except (ProtocolError, AttributeError):
            counts = None
        if isinstance(counts, list) and all(type(n) is int and n >= 1 for n in counts):
            starts = [1 + sum(counts[:i]) for i in range(len(counts))]
            if sum(counts) == len(frames) - 1:
                headers = [frames[i] for i in starts]
    else:
        return []
    ids = []
    for header in headers:
        job = peek([header], "job") if peek([header], "k") == "job" else None
        if isinstance(job, int) and job not in ids:
            ids.append(job)
    return ids
