"""One field of a header the decoder refused, read anyway.

A job or a request whose header cannot be decoded (a map key the decoder
cannot hash, a value nested past its stack, a bad array reference) must
still get its one answer, under its own id. Decoding the whole header again
would fail the same way, so the header is read entry by entry with msgpack's
streaming ``Unpacker``: the value of the wanted key is decoded alone, every
other value is skipped without being built (``skip`` at C speed, so an
unhashable key elsewhere does not matter), and a value nested too deep for
``skip`` is stepped over by a small counting scanner. The work is bounded:
at most ``PEEK_ENTRIES`` entries, ``SKIP_BUDGET`` objects scanned slowly,
and the frame's own size.
"""

from __future__ import annotations

import io
from typing import Any

import msgpack

from protocol.arrays import as_bytes

PEEK_ENTRIES = 64
"""Header entries read looking for the key; an id further in is not found."""
SKIP_BUDGET = 100_000
"""Objects the counting scanner steps over before it gives up."""
_READ_SIZE = 64 * 1024


def read_field(frames: list, key: str, limit: int) -> int | str | None:
    """``key``'s value in the header frame ``frames[0]`` if it is an int or
    a string (not a bool) and can be read; otherwise None. Never raises."""
    try:
        data = as_bytes(frames[0])
        if len(data) > limit:
            return None
        value = _Header(data, limit).find(key)
    except Exception:  # noqa: BLE001 - unreadable is an answer too
        return None
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


class _Unreadable(Exception):
    pass


_UNREADABLE = object()


class _Header:
    def __init__(self, data: bytes, limit: int):
        self._data = data
        self._limit = limit
        self._stream = io.BytesIO(data)  # shares the bytes, no copy
        self._base = 0
        self._unpacker: msgpack.Unpacker = self._at(0)

    def _at(self, pos: int) -> msgpack.Unpacker:
        self._stream.seek(pos)
        self._base = pos
        self._unpacker = msgpack.Unpacker(
            self._stream,
            read_size=_READ_SIZE,
            max_buffer_size=self._limit + 1,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=lambda code, data: None,
        )
        return self._unpacker

    def _pos(self) -> int:
        return self._base + self._unpacker.tell()

    def find(self, key: str) -> Any:
        entries = self._unpacker.read_map_header()
        for _ in range(min(entries, PEEK_ENTRIES)):
            found = self._read()
            if isinstance(found, str) and found == key:
                return self._read()
            self._skip()
        return None

    def _read(self) -> Any:
        start = self._pos()
        try:
            return self._unpacker.unpack()
        except (ValueError, TypeError):  # unhashable keys or too deep inside it; OutOfData is fatal
            self._skip_from(start)
            return _UNREADABLE

    def _skip(self) -> None:
        start = self._pos()
        try:
            self._unpacker.skip()
        except msgpack.StackError:
            self._skip_from(start)

    def _skip_from(self, start: int) -> None:
        """Past the value at ``start``, whatever state a failed ``unpack``
        or ``skip`` left the unpacker in."""
        try:
            self._at(start).skip()
            return
        except msgpack.StackError:
            pass
        end = _skip_counting(self._data, start)
        if end is None:
            raise _Unreadable
        self._at(end)


# Bytes after the type byte, for msgpack's fixed-size types.
_FIXED = (
    {0xC0: 0, 0xC2: 0, 0xC3: 0}  # nil, false, true
    | {0xCA: 4, 0xCB: 8}  # float 32, 64
    | {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # uint 8 to 64
    | {0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}  # int 8 to 64
    | {0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}  # fixext 1 to 16, with its ext type byte
)
# Length-prefixed types: (bytes of length, extra bytes after it: the ext type).
_SIZED = (
    {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0)}  # bin 8, 16, 32
    | {0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}  # ext 8, 16, 32
    | {0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}  # str 8, 16, 32
)
# Containers: (bytes of count, objects per counted element).
_COUNTED = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _skip_counting(data: bytes, pos: int, budget: int = SKIP_BUDGET) -> int | None:
    """The offset just past the msgpack value at ``pos``, or None when it is
    malformed or takes more than ``budget`` objects. No stack: it only
    counts the objects still to step over, so no nesting is too deep."""
    end = len(data)
    left = 1
    while left:
        budget -= 1
        if budget < 0 or pos >= end:
            return None
        b = data[pos]
        pos += 1
        left -= 1
        if b <= 0x7F or b >= 0xE0:  # fixint
            continue
        if b <= 0x8F:
            left += 2 * (b & 0x0F)
        elif b <= 0x9F:
            left += b & 0x0F
        elif b <= 0xBF:
            pos += b & 0x1F
        elif b in _FIXED:
            pos += _FIXED[b]
        elif b in _SIZED:
            size, extra = _SIZED[b]
            pos += size + extra + int.from_bytes(data[pos : pos + size], "big")
        elif b in _COUNTED:
            size, per = _COUNTED[b]
            left += per * int.from_bytes(data[pos : pos + size], "big")
            pos += size
        else:  # 0xc1, never used
            return None
    return pos if pos <= end else None
