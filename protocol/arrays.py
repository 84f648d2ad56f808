"""Arrays on the wire: raw frames after the msgpack header, never pickle.

A numpy array (or a CPU torch tensor) anywhere in a message's values is
packed as msgpack ext type ``ARRAY_EXT`` whose data is the msgpack array
``[frame, dtype, shape]``: ``frame`` is the index of a later ZeroMQ frame
(1 is the first frame after the header), ``dtype`` a numpy type string such
as ``"<f4"``, ``shape`` a list of sizes. The frame holds the array's bytes in
C order, exactly ``prod(shape) * itemsize`` of them.

Why frames and not msgpack ``bin``: a frame is sent from the array's own
memory (ZeroMQ ``copy=False``) and received into a buffer numpy wraps as it
is, so a 64 MiB embedding matrix is never copied by the protocol on either
side. Only a non-contiguous input is copied once, to lay it out in C order.

numpy is imported lazily: a process that never sees an array never loads it
(the supervisor's idle footprint stays small). A torch tensor is recognised
by its type's module, so this module never imports torch either.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack

from protocol.errors import ProtocolError

ARRAY_EXT = 1
"""The one msgpack ext type the protocol defines; every other code is refused."""
MAX_ARRAYS = 1024
"""Per message: with the header, 1025 frames. Checked when encoding too, so
what one side sends the other always accepts."""
MAX_DIMS = 32

# Plain numeric kinds: bool, signed and unsigned integers, floats, complex.
# Object, string, void (structured) and datetime dtypes are refused: they are
# either pointers or need a schema the other side may not share.
_KINDS = frozenset("biufc")


def is_array(obj: Any) -> bool:
    module = type(obj).__module__
    return (module == "numpy" and type(obj).__name__ == "ndarray") or module.startswith("torch")


def _as_ndarray(obj: Any):
    """A numpy view of ``obj`` (a copy only where C order demands one)."""
    if type(obj).__module__.startswith("torch"):
        if not hasattr(obj, "detach") or not hasattr(obj, "device"):
            raise TypeError(f"not msgpack-encodable: {type(obj).__name__} (only tensors travel)")
        if obj.device.type != "cpu":
            raise TypeError(f"a tensor on {obj.device} cannot be sent: move it to the CPU first (.cpu())")
        try:
            obj = obj.detach().resolve_conj().resolve_neg().numpy()
        except (TypeError, RuntimeError) as exc:  # bfloat16 and friends have no numpy dtype
            raise TypeError(f"a {obj.dtype} tensor cannot be sent as an array ({exc}); convert it first") from None
    if obj.dtype.kind not in _KINDS or obj.dtype.fields is not None:
        raise TypeError(f"an array of dtype {obj.dtype} cannot be sent: only bool, int, uint, float and complex")
    if obj.ndim > MAX_DIMS:
        raise TypeError(f"an array of {obj.ndim} dimensions cannot be sent: at most {MAX_DIMS}")
    return obj if obj.flags.c_contiguous else obj.copy(order="C")  # ascontiguousarray makes 0-d into 1-d


def packer(frames: list) -> msgpack.Packer:
    """A msgpack packer that appends each array's buffer to ``frames`` and
    leaves a reference in its place."""

    def default(obj: Any) -> Any:
        if not is_array(obj):
            raise TypeError(f"can not serialize {type(obj).__name__!r} object")
        if len(frames) >= MAX_ARRAYS:
            raise TypeError(f"a message carries at most {MAX_ARRAYS} arrays; stack them into fewer")
        arr = _as_ndarray(obj)
        frames.append(memoryview(arr).cast("B") if arr.size else b"")
        ref = msgpack.packb([len(frames), arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(ARRAY_EXT, ref)

    return msgpack.Packer(use_bin_type=True, datetime=False, default=default)


class _ArrayStandIn:
    """What a reference resolves to when only checking: unhashable, like the
    numpy array the receiver makes, so an array used as a map key is refused
    by the check exactly as the receiver would refuse it."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]


_STAND_IN = _ArrayStandIn()


class FrameRefs:
    """The ext hook for unpacking: resolves references against the frames
    that came after the header, and checks that each is used exactly once.
    With ``materialise=False`` every check is made but no array is built:
    the sender's check of its own message (``protocol.values``)."""

    def __init__(self, frames: list, limit: int, materialise: bool = True):
        self._frames = frames
        self._limit = limit
        self._materialise = materialise
        self._used: set[int] = set()

    def __call__(self, code: int, data: bytes) -> Any:
        if code != ARRAY_EXT:
            raise ProtocolError(f"msgpack ext type {code} is not part of the protocol")
        try:
            index, dtype, shape = msgpack.unpackb(data, raw=False, use_list=True)
        except Exception as exc:  # noqa: BLE001 - any malformed reference is the sender's fault
            raise ProtocolError(f"malformed array reference: {type(exc).__name__}: {exc}") from None
        if type(index) is not int or not 1 <= index <= len(self._frames):
            raise ProtocolError(
                f"array reference to frame {index!r}; the message has {len(self._frames)} after its header"
            )
        if index in self._used:
            raise ProtocolError(f"frame {index} is referenced twice")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape) or len(shape) > MAX_DIMS:
            raise ProtocolError(f"array shape {shape!r} is not a list of at most {MAX_DIMS} sizes >= 0")
        import numpy as np

        try:
            dt = np.dtype(dtype) if isinstance(dtype, str) else None
        except TypeError:
            dt = None
        if dt is None or dt.kind not in _KINDS or dt.fields is not None:
            raise ProtocolError(f"array dtype {dtype!r} is not a plain numeric numpy type string such as '<f4'")
        frame = self._frames[index - 1]
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        expected = math.prod(shape) * dt.itemsize
        if len(buf) != expected or expected > self._limit:
            raise ProtocolError(
                f"array frame {index} has {len(buf)} bytes; dtype {dt.str} shape {shape} needs {expected}"
                + (f" (over the {self._limit}-byte limit)" if expected > self._limit else "")
            )
        self._used.add(index)
        if not self._materialise:
            return _STAND_IN
        if not expected:
            return np.zeros(shape, dtype=dt)
        arr = np.frombuffer(buf, dtype=dt).reshape(shape)
        # libzmq packs small messages into a shared buffer at any offset;
        # code that assumes aligned data (numba, SIMD, C extensions) must
        # not see that. Large frames have buffers of their own, aligned.
        return arr if arr.flags.aligned else arr.copy()

    def check_all_used(self) -> None:
        if len(self._used) != len(self._frames):
            unused = sorted(set(range(1, len(self._frames) + 1)) - self._used)
            raise ProtocolError(f"frames {unused} after the header are not referenced by it")


def as_bytes(frame: Any) -> bytes:
    """A received part as bytes, whether it came as bytes or as a zmq.Frame."""
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def nbytes(frame: Any) -> int:
    return len(frame.buffer) if hasattr(frame, "buffer") else len(frame)
