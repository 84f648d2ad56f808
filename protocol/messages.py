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

import msgpack

from protocol import values
from protocol.arrays import MAX_ARRAYS, FrameRefs, as_bytes, nbytes, packer
from protocol.errors import ProtocolError
from protocol.peek import read_field

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest frame either side encodes or decodes, header or array. A payload
past it fails at ``submit()``; a received frame past it is refused before it
is unpacked."""


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
    kind: ClassVar[Kind] = Kind.HEARTBEAT
    busy: bool
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


def pack(obj: Any) -> bytes:
    """msgpack with bin/str kept apart, and only what a receiver decodes
    (see ``protocol.values``). Raises TypeError, naming the path and the
    reason, for anything else; there is no fallback to pickle."""
    try:
        data = msgpack.packb(obj, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(values.explain(obj) or f"not msgpack-encodable: {exc}") from None
    values.check(data, [], MAX_MESSAGE_BYTES, obj)
    return data


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not part of the protocol")


def unpack(data: bytes, limit: int = MAX_MESSAGE_BYTES, ext_hook=_refuse_ext) -> Any:
    """Inverse of ``pack`` for untrusted bytes: size-checked first, any
    decoder failure (truncation, nesting past msgpack's stack, an unhashable
    key, trailing bytes, ext types ``ext_hook`` refuses) becomes a
    ``ProtocolError``."""
    if len(data) > limit:
        raise ProtocolError(f"frame of {len(data)} bytes is over the {limit}-byte limit")
    try:
        return values.unpackb(data, ext_hook)
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - msgpack raises ValueError, TypeError, StackError ...
        raise ProtocolError(f"malformed msgpack: {values.describe(exc)}") from None


def pack_frames(header: dict, limit: int = MAX_MESSAGE_BYTES, what: str = "message") -> list:
    """``header`` as a msgpack frame followed by one frame per array in it
    (buffers, not copies), checked with the receiver's own decoder. Raises
    TypeError, naming the path, for what a receiver could not decode, and
    ProtocolError for a frame over ``limit``."""
    arrays: list = []
    try:
        frame = packer(arrays).pack(header)
    except (TypeError, ValueError, OverflowError) as exc:
        text = str(exc)
        if text.startswith(("not msgpack", "a ", "an ")):  # our own words, from the array hook
            raise TypeError(text) from None
        raise TypeError(values.explain(header) or f"not msgpack-encodable: {text}") from None
    for n, buf in enumerate([frame, *arrays]):
        if nbytes(buf) > limit:
            part = "header" if n == 0 else f"array in frame {n}"
            raise ProtocolError(f"{what}: {part} of {nbytes(buf)} bytes is over the {limit}-byte frame limit")
    values.check(frame, arrays, limit, header)
    return [frame, *arrays]


def encode(msg: _Message, limit: int = MAX_MESSAGE_BYTES) -> list:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "k": msg.kind.value}
    for name, _type, *optional in msg.fields:
        value = getattr(msg, name)
        if not optional or (value is not None and value is not False):
            header[name] = value
    return pack_frames(header, limit, f"{msg.kind.value} message")


@dataclass(frozen=True, slots=True)
class PackedPayload:
    """A payload still in msgpack as a client sent it, ``data``, with the
    array frames its references name, in their order: forwarded to the
    worker without being decoded. A daemon that decoded every payload held
    what the bytes decode to, up to some 70 times their size (3.8 MB of
    empty arrays is 282 MB of Python lists); forwarded, it holds the bytes
    it received, which its queue counts. The worker decodes it with the one
    decoder, and a payload it cannot read fails that job, under its id."""

    data: bytes | memoryview
    frames: list


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


def pack_packed(
    head: dict, key: str, packed: PackedPayload, limit: int = MAX_MESSAGE_BYTES, what: str = "message"
) -> list:
    """The frames of ``head`` with ``key`` set to ``packed``'s msgpack as it
    is (not decoded, not packed again), then its array frames."""
    pk = msgpack.Packer(use_bin_type=True, datetime=False)
    parts = [
        pk.pack_map_header(len(head) + 1),
        *(pk.pack(k) + pk.pack(v) for k, v in head.items()),
        pk.pack(key),
        bytes(packed.data),
    ]
    frame = b"".join(parts)
    for n, buf in enumerate([frame, *packed.frames]):
        if nbytes(buf) > limit:
            part = "header" if n == 0 else f"array in frame {n}"
            raise ProtocolError(f"{what}: {part} of {nbytes(buf)} bytes is over the {limit}-byte frame limit")
    if len(packed.frames) > MAX_ARRAYS:
        raise ProtocolError(f"{what} has {len(packed.frames)} arrays; at most {MAX_ARRAYS}")
    return [frame, *packed.frames]


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


MAX_FRAMES = MAX_ARRAYS + 1
"""A header and at most 1024 arrays: bounds what one message can make us hold."""


def peek(frames: list, key: str) -> int | str | None:
    """``key`` from a header the protocol refused, when it can still be read
    (see ``protocol.peek``), so that a malformed job or request is answered
    under its id instead of waiting forever. None if unreadable."""
    return read_field(frames, key, MAX_MESSAGE_BYTES)


def unpack_map(frames: list, limit: int, what: str = "message") -> dict:
    """The shape every message of both protocols has: a msgpack map, then
    one frame per array it refers to. Arrays come back as numpy arrays over
    the received frames' memory."""
    if not frames:
        raise ProtocolError(f"empty {what}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{what} has {len(frames)} frames; at most {MAX_FRAMES} (a header and 1024 arrays)")
    refs = FrameRefs(list(frames[1:]), limit)
    header = unpack(as_bytes(frames[0]), limit, ext_hook=refs)
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} is a msgpack {type(header).__name__}, expected a map")
    refs.check_all_used()
    return header


_CONTAINERS = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])  # the first byte of a msgpack map or array


class Container:
    """A field that held an array or a map where a plain value was
    expected: skipped, not built, and refused by the field's type check."""


def unpack_map_packed(frames: list, limit: int, packed: str, what: str = "message") -> dict:
    """``unpack_map``, except that the value of the field ``packed`` is left
    as the msgpack bytes it is (a ``PackedPayload`` with the frames after
    the header), and any other field holding a container is skipped, not
    built (a ``Container``): the fields around a payload are plain values,
    so nothing a request carries is decoded into objects here. msgpack's
    own parser checks the payload is well-formed as it skips it."""
    if not frames:
        raise ProtocolError(f"empty {what}")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{what} has {len(frames)} frames; at most {MAX_FRAMES} (a header and 1024 arrays)")
    data = as_bytes(frames[0])
    if len(data) > limit:
        raise ProtocolError(f"frame of {len(data)} bytes is over the {limit}-byte limit")
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **values.DECODER, ext_hook=_refuse_ext)
    unpacker.feed(data)
    header: dict[Any, Any] = {}
    try:
        try:
            size = unpacker.read_map_header()
        except msgpack.UnpackValueError:
            raise ProtocolError(f"{what} is not a msgpack map") from None
        for _ in range(size):
            key = unpacker.unpack() if data[unpacker.tell()] not in _CONTAINERS else None
            if key is None:
                raise ProtocolError(f"{what} has a key that is not a plain value")
            start = unpacker.tell()
            if key == packed:
                unpacker.skip()
                header[key] = PackedPayload(memoryview(data)[start : unpacker.tell()], list(frames[1:]))
            elif data[start] in _CONTAINERS:
                unpacker.skip()
                header[key] = Container()
            else:
                header[key] = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ProtocolError(f"malformed msgpack: {len(data) - unpacker.tell()} bytes after the {what}")
    except ProtocolError:
        raise
    except IndexError:
        raise ProtocolError(f"malformed msgpack: the {what} ends too soon") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises ValueError, OutOfData, StackError ...
        raise ProtocolError(f"malformed msgpack: {values.describe(exc)}") from None
    if packed not in header and len(frames) > 1:
        raise ProtocolError(f"{what} has {len(frames) - 1} frames after its header and no {packed!r} to use them")
    return header


def check_version(header: dict) -> None:
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # True == 1 in Python
        raise ProtocolError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")


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
