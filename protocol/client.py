"""Client <-> daemon messages: the requests a local client sends to
``gpuvisor serve`` and the one reply each gets. ``docs/protocol.md`` (part 2)
is the contract; this module is its one implementation.

A request is one msgpack map ``{"v": 1, "k": <kind>, "id": <request id>,
...fields}``; the id is the client's own (an int or a string), echoed in the
reply, so a client can pipeline many requests on one socket. Unlike the
worker protocol, optional fields may be left out and take their defaults:
clients are written by other people, in other languages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from protocol.errors import GpuvisorError, ProtocolError
from protocol.packing import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Container,
    PackedPayload,
    check_version,
    pack,
    pack_frames,
    pack_packed,
    peek,
    unpack_map,
    unpack_map_packed,
)


class Request(enum.StrEnum):
    """Request kinds; the values go on the wire as they are."""

    SUBMIT = "submit"
    SWITCH = "switch"
    RESTART = "restart"
    STATUS = "status"
    CANCEL = "cancel"
    PING = "ping"
    SHUTDOWN = "shutdown"
    MODES = "modes"
    METRICS = "metrics"
    UNLOAD = "unload"
    RELOAD = "reload"
    EVENTS = "events"  # answered with a chunk per event until cancelled; then one reply
    GLANCE = "glance"  # the status, the last switches, memory over time, the last errors


REPLY = "reply"
CHUNK = "chunk"  # a streamed submit's piece, before its one reply

_NUMBER = (int, float)
_NONE = type(None)
# kind -> field -> (accepted types, default; _REQUIRED if it must be there)
_REQUIRED = object()
_FIELDS: dict[Request, dict[str, tuple[tuple[type, ...], Any]]] = {
    Request.SUBMIT: {
        "task": ((str,), _REQUIRED),
        "payload": ((object,), None),
        "mode": ((str, _NONE), None),
        "timeout": ((*_NUMBER, _NONE), None),
        "retries": ((int,), 0),
        "stream": ((bool,), False),
    },
    Request.SWITCH: {"mode": ((str,), _REQUIRED), "device": ((str, _NONE), None)},
    Request.RESTART: {"mode": ((str, _NONE), None), "device": ((str, _NONE), None)},
    Request.STATUS: {},
    Request.CANCEL: {"target": ((int, str), _REQUIRED)},
    Request.PING: {},
    Request.SHUTDOWN: {"drain": ((bool,), True), "timeout": ((*_NUMBER, _NONE), None)},
    Request.MODES: {},
    Request.METRICS: {},
    Request.UNLOAD: {"device": ((str, _NONE), None)},
    Request.RELOAD: {},
    Request.EVENTS: {"buffer": ((int, _NONE), None)},
    Request.GLANCE: {},
}


@dataclass(frozen=True, slots=True)
class ClientRequest:
    kind: Request
    id: int | str
    args: dict[str, Any]


class BadRequest(ProtocolError):
    """A request that could not be read; ``request_id`` is its id when the
    map got far enough to have one, so the error reply can name it."""

    def __init__(self, message: str, request_id: int | str | None = None):
        super().__init__(message)
        self.request_id = request_id


def _ok(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, Container):
        return False
    if isinstance(value, bool) and bool not in types and object not in types:
        return False  # True is not a number of seconds, nor a retry count
    return isinstance(value, types)


def decode_request(frames: list[bytes], limit: int = MAX_MESSAGE_BYTES, packed_payload: bool = False) -> ClientRequest:
    """``packed_payload``: a submit's payload stays the msgpack it came as
    (a ``PackedPayload``), for a daemon that forwards it to a worker
    without decoding it."""
    try:
        msg = (
            unpack_map_packed(frames, limit, "payload", "request")
            if packed_payload
            else unpack_map(frames, limit, "request")
        )
    except ProtocolError as exc:  # answered under its id when the header still shows one
        raise BadRequest(exc.message, peek(frames, "id") if frames else None) from None
    rid = msg.get("id")
    rid = rid if isinstance(rid, (int, str)) and not isinstance(rid, bool) else None
    if rid is None:
        raise BadRequest("request lacks an 'id' (an int or a string)")
    try:
        check_version(msg)
    except ProtocolError as exc:
        raise BadRequest(exc.message, rid) from None
    try:
        kind = Request(str(msg.get("k")))
    except ValueError:
        raise BadRequest(f"unknown request kind {msg.get('k')!r}; known: {', '.join(Request)}", rid) from None
    args: dict[str, Any] = {}
    for name, (types, default) in _FIELDS[kind].items():
        if name not in msg or (msg[name] is None and default is not _REQUIRED and _NONE not in types):
            if default is _REQUIRED:
                raise BadRequest(f"{kind.value} request lacks field {name!r}", rid)
            args[name] = default
            continue
        if not _ok(msg[name], types):
            want = " or ".join("nil" if t is _NONE else t.__name__ for t in types)
            got = "an array or map" if isinstance(msg[name], Container) else type(msg[name]).__name__
            raise BadRequest(f"{kind.value}.{name} is {got}, expected {want}", rid)
        args[name] = msg[name]
    return ClientRequest(kind, rid, args)


def encode_request(kind: Request | str, request_id: int | str, **fields: Any) -> list:
    """Arrays in ``fields`` go as frames after the header, as in part 1."""
    return pack_frames({"v": PROTOCOL_VERSION, "k": str(kind), "id": request_id, **fields}, what="request")


def encode_reply(request_id: int | str | None, *, value: Any = None, error: GpuvisorError | None = None) -> list:
    """The one reply to a request. A value msgpack cannot carry, or one over
    the limit, becomes an error reply instead of no reply."""
    head = {"v": PROTOCOL_VERSION, "k": REPLY, "id": request_id}
    if error is None and isinstance(value, PackedPayload):  # a worker's answer, forwarded as it came
        try:
            return pack_packed({**head, "ok": True}, "value", value, MAX_MESSAGE_BYTES, "the reply")
        except ProtocolError as exc:
            error = exc
    if error is None:
        try:
            return pack_frames({**head, "ok": True, "value": value}, MAX_MESSAGE_BYTES, "the reply")
        except ProtocolError as exc:
            error = exc
        except TypeError as exc:
            error = ProtocolError(f"the reply cannot be encoded: {exc}")
    wire = error.to_wire()
    try:
        return [pack({**head, "ok": False, "error": wire})]
    except TypeError:
        return [pack({**head, "ok": False, "error": {"code": error.code, "message": error.message}})]


def encode_chunk(request_id: int | str, seq: int, value: Any) -> list:
    """One piece of a streamed submit. Not a reply: the request still gets
    exactly one reply, after its last chunk."""
    head = {"v": PROTOCOL_VERSION, "k": CHUNK, "id": request_id, "seq": seq}
    if isinstance(value, PackedPayload):  # a worker's chunk, forwarded as it came
        return pack_packed(head, "value", value, MAX_MESSAGE_BYTES, "chunk")
    return pack_frames({**head, "value": value}, what="chunk")


@dataclass(frozen=True, slots=True)
class Reply:
    id: int | str | None
    ok: bool
    value: Any = None
    error: dict | None = None
    seq: int | None = None  # set on a chunk, which is not the reply


def decode_reply(frames: list, limit: int = MAX_MESSAGE_BYTES) -> Reply:
    msg = unpack_map(frames, limit, "reply")
    check_version(msg)
    if msg.get("k") == CHUNK:
        seq = msg.get("seq")
        if type(seq) is not int or "value" not in msg:
            raise ProtocolError("chunk lacks an int 'seq' or a 'value'")
        return Reply(msg.get("id"), True, msg["value"], None, seq)
    if msg.get("k") != REPLY:
        raise ProtocolError(f"expected a reply or a chunk, got kind {msg.get('k')!r}")
    ok = msg.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("reply lacks a boolean 'ok'")
    if not ok and not isinstance(msg.get("error"), dict):
        raise ProtocolError("error reply lacks an 'error' map")
    return Reply(msg.get("id"), ok, msg.get("value"), msg.get("error"))
