"""The frames every message of both protocols has: a msgpack map, checked
against the limits, then one frame per array it refers to. Packing and
unpacking untrusted bytes, with the one decoder (``protocol.values``), for
the worker's messages (``protocol.messages``) and the clients'
(``protocol.client``) alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
