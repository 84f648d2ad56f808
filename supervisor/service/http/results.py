"""A task's result (anything msgpack carries, with numpy arrays) in the
forms ``POST /v1/jobs`` answers: JSON, msgpack, or an array's ``.npy``.

JSON has no arrays of numbers with a type, nor bytes, so both get a
documented shape (docs/http.md, "Results as JSON"):

* an array: ``{"dtype": "float32", "shape": [2, 3], "data": [...]}``, the
  values in C order as one flat list (complex: ``[re, im]`` pairs; NaN and
  the infinities as ``null``, which JSON has no word for);
* bytes: ``{"base64": "..."}``;
* a map key that is not a string: its JSON text (``1``, ``true``, ``null``).

msgpack carries all of that natively but an array, which on the wire is a
reference to a frame of its own: an HTTP body is one buffer, so an array is
``{"dtype": "<f4", "shape": [2, 3], "data": <bin>}`` there, the wire's own
dtype string and its bytes in C order, so a caller builds it back without
a copy (``np.frombuffer(data, dtype).reshape(shape)``).

Encoding a large result takes a while with the GIL held: ``small`` says
when it may run on the event loop; otherwise it goes to a thread.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import msgpack
import numpy as np
import orjson

from supervisor.service.http.errors import ApiError

JSON, MSGPACK, NPY = "application/json", "application/msgpack", "application/x-npy"
MSGPACK_ALIASES = ("application/x-msgpack", "application/vnd.msgpack")  # older names some clients send
INLINE_VALUES = 4096  # a result of up to this many values is written on the event loop: well under a millisecond


def _native(array: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat if flat.dtype.isnative else flat.astype(flat.dtype.newbyteorder("="))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        flat = _native(value)
        if flat.dtype.kind == "c":
            flat = np.stack([flat.real, flat.imag], axis=-1)
        data = orjson.Fragment(orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY))
        return {"dtype": value.dtype.name, "shape": list(value.shape), "data": data}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"base64": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} has no JSON form")


def as_json(value: Any) -> bytes:
    """``value`` as JSON; a map whose keys JSON cannot name (bytes) is the task's own affair: a 406."""
    try:
        return orjson.dumps(value, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        message = f"the task's result has no JSON form ({exc}): ask for it as msgpack (Accept: application/msgpack)"
        raise ApiError(406, message, "not_acceptable") from None


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        flat = np.ascontiguousarray(value)
        return {"dtype": flat.dtype.str, "shape": list(value.shape), "data": flat.reshape(-1).data.cast("B")}
    raise TypeError(f"{type(value).__name__} has no msgpack form")


def as_msgpack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True, datetime=False, default=_msgpack_default)


def as_npy(value: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, value, allow_pickle=False)
    return out.getvalue()


def small(value: Any, budget: int = INLINE_VALUES) -> bool:
    """Whether ``value`` holds at most ``budget`` values (each string,
    bytes, number or array element one, a long string one per 64
    characters); stops counting once past it."""

    def count(item: Any, left: int) -> int:
        if isinstance(item, np.ndarray):
            return left - max(1, item.size)
        if isinstance(item, str | bytes):
            return left - 1 - len(item) // 64
        if isinstance(item, dict):
            for key, inner in item.items():
                left = count(inner, count(key, left))
                if left < 0:
                    break
            return left
        if isinstance(item, list):
            for inner in item:
                left = count(inner, left)
                if left < 0:
                    break
            return left - 1
        return left - 1

    return count(value, budget) >= 0


def encode(value: Any, media: str) -> bytes:
    """``value`` in the form ``media`` names (an array, for ``.npy``)."""
    if media == NPY:
        return as_npy(value)
    if media == MSGPACK or media in MSGPACK_ALIASES:
        return as_msgpack(value)
    return as_json(value)
