"""What a value on the wire may be: one definition, the decoder's.

Every receiver decodes a frame with ``unpackb`` below. msgpack's packer is
more lenient than that decoder: it packs a tuple map key as an array (which
decodes as an unhashable list) and nests an empty container one level past
the decoder's stack. So a sender does not trust its packer: ``check``
decodes each frame it built with that same decoder (arrays checked but not
built) and refuses, with a ``TypeError``, whatever a receiver would refuse.
Only then, on that rare path, ``explain`` walks the Python object to say
where and why, e.g. ``payload['a'][0]: a map key of type tuple cannot be
sent``. What one side sends, the other accepts: there is no second list of
rules to drift from the first.
"""

from __future__ import annotations

from typing import Any

import msgpack

from protocol.arrays import ARRAY_EXT, FrameRefs, is_array

MAX_DEPTH = 1024
"""Containers nested in one frame, the message's own map included: the
depth of msgpack's decoder stack. A message field may nest 1,023 levels."""
MAX_CONTAINER_LEN = 1 << 20
"""Items in one array or map (1,048,576). Past it a frame is refused before
anything is built: a long list of small values costs some 70 bytes of Python
objects per byte on the wire, so bulk data belongs in an array frame."""
MAX_EXT_LEN = 4096  # an array reference: [frame, dtype, shape] is a few dozen bytes

KEY_TYPES = "str, int, float, bool, bytes or None"
_KEY_TYPES = (str, bytes, memoryview, int, float, type(None), msgpack.Timestamp)  # bool is an int
_SCALARS = (str, bytes, bytearray, memoryview, int, float, type(None), msgpack.Timestamp)
_WALK_BUDGET = 2_000_000  # objects visited while explaining: a shared subtree is visited once per reference
_PATH_SHOWN = 12  # path segments shown before eliding the middle of a long path


def unpackb(data: Any, ext_hook) -> Any:
    """The one decoder configuration every receiver uses: bin and str kept
    apart, arrays as lists, keys of any hashable type, each container at
    most ``MAX_CONTAINER_LEN`` items."""
    return msgpack.unpackb(data, **DECODER, ext_hook=ext_hook)


DECODER = {
    "raw": False,
    "strict_map_key": False,
    "use_list": True,
    "max_array_len": MAX_CONTAINER_LEN,
    "max_map_len": MAX_CONTAINER_LEN,
    "max_ext_len": MAX_EXT_LEN,
}
"""The decoder's settings, for a streaming ``Unpacker`` too."""


def _no_arrays(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} with no array frames after the header")


def describe(exc: BaseException) -> str:
    """A decoder failure in words a sender can act on."""
    if isinstance(exc, msgpack.StackError):
        return f"nested deeper than {MAX_DEPTH:,} levels (the message's own map counts as one)"
    if isinstance(exc, ValueError) and "exceeds max_" in str(exc):
        return (
            f"{exc}: an array or map holds at most {MAX_CONTAINER_LEN:,} items "
            "(send bulk data as a numpy array, which travels as a frame of its own)"
        )
    if isinstance(exc, TypeError) and "unhashable" in str(exc):
        return (
            f"a map key is an array, a map or an array reference ({exc}); "
            "keys must be nil, bool, int, float, str or bin"
        )
    return f"{type(exc).__name__}: {exc}"


def check(frame: bytes, arrays: list, limit: int, obj: Any) -> None:
    """Raise ``TypeError`` unless a receiver would decode ``frame`` (with
    ``arrays`` after it), which was packed from ``obj``."""
    refs = FrameRefs(arrays, limit, materialise=False) if arrays else None
    try:
        unpackb(frame, refs or _no_arrays)  # with no frames after it, every reference is refused: a cheaper hook
        if refs is not None:
            refs.check_all_used()
    except Exception as exc:  # noqa: BLE001 - whatever the decoder refuses, the sender refuses
        raise TypeError(explain(obj) or f"cannot be sent: a receiver could not decode it ({describe(exc)})") from None


def explain(obj: Any) -> str | None:
    """Where and why ``obj`` cannot travel, found by walking it in the
    order msgpack packs it; None if nothing is found. A map's string keys
    name its fields (``payload['a'][0]``); anything else is ``value``."""
    return _Walker(obj).run()


_ROOT = ("value",)  # the path of a root that is not a map, and of a root map's non-string keys
_KEY = object()  # stack marker: check this map key
_LEAVE = object()  # stack marker: leaving this container (for cycle detection)


class _Walker:
    """An iterative depth-first walk (a value may nest past Python's
    recursion limit). A path is ``None`` for the root, ``(name,)`` for a
    field of the root map, else ``(parent, key or index)``: linked, so deep
    nesting costs no copying."""

    def __init__(self, root: Any):
        self.root = root
        self.fields = isinstance(root, dict)
        self.stack: list = []
        self.ancestors: set[int] = set()
        self.budget = _WALK_BUDGET
        if self.fields:
            self.ancestors.add(id(root))
            self.push_items(root, 1, None)
        else:
            self.stack.append((root, 1, _ROOT))

    def push_items(self, obj: dict, depth: int, path) -> None:
        for key, value in reversed(list(obj.items())):
            if path is None:
                child = (key,) if isinstance(key, str) else (_ROOT, key)
            else:
                child = (path, key)
            self.stack.append((value, depth + 1, child))
            self.stack.append((_KEY, key, path))

    def run(self) -> str | None:
        stack = self.stack
        while stack:
            self.budget -= 1
            if self.budget < 0:
                return None
            first, second, path = stack.pop()
            if first is _LEAVE:
                self.ancestors.discard(second)
            elif first is _KEY:
                if not isinstance(second, _KEY_TYPES):
                    return (
                        f"{_format(path)}: a map key of type {type(second).__name__} cannot be sent: "
                        f"{_short(second)} (keys must be {KEY_TYPES})"
                    )
            else:
                problem = self.visit(first, second, path)
                if problem:
                    return problem
        return None

    def visit(self, value: Any, depth: int, path) -> str | None:
        """``depth``: the level ``value`` sits at if it is a container."""
        if isinstance(value, msgpack.ExtType):  # a namedtuple: not a container here
            if value.code == ARRAY_EXT:
                return f"{_format(path)}: a hand-made array reference (ext type 1) cannot be sent; send the array"
            return f"{_format(path)}: msgpack ext type {value.code} cannot be sent; arrays are the only ext type"
        if isinstance(value, (dict, list, tuple)):
            if id(value) in self.ancestors:
                return f"{_format(path)}: contains itself (a reference cycle), which msgpack cannot carry"
            if depth > MAX_DEPTH:
                return self.too_deep(path)
            self.ancestors.add(id(value))
            self.stack.append((_LEAVE, id(value), None))
            if isinstance(value, dict):
                self.push_items(value, depth, path)
            else:
                for i in range(len(value) - 1, -1, -1):
                    self.stack.append((value[i], depth + 1, (path, i)))
            return None
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            return f"{_format(path)}: the integer {_short(value)} is not msgpack-encodable: out of its 64-bit range"
        if not isinstance(value, _SCALARS) and not is_array(value):
            return f"{_format(path)}: an object of type {type(value).__name__} is not msgpack-encodable"
        return None

    def too_deep(self, path) -> str:
        """Names the field and its whole depth, not just where the limit was
        crossed, so the caller sees how far over it is."""
        while len(path) == 2:
            path = path[0]
        if self.fields and path is not _ROOT:
            name, value, allowed = path[0], self.root[path[0]], MAX_DEPTH - 1
        else:
            name, value, allowed = _ROOT[0], self.root, MAX_DEPTH
        depth = _depth(value, self.budget)
        how = f"{depth:,} levels deep" if depth else f"more than {allowed:,} levels deep"
        where = f" in a message field ({MAX_DEPTH:,} with the message's own map)" if allowed < MAX_DEPTH else ""
        return f"{name}: nested {how}; the wire carries at most {allowed:,}{where}"


def _container(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple)) and not isinstance(value, msgpack.ExtType)


def _depth(value: Any, budget: int) -> int | None:
    """Containers on the deepest path of ``value``; None past ``budget``
    visits or on a cycle."""
    deepest = 0
    stack = [(value, 1)]
    on_path: list[int] = []  # ids of the containers above the one popped (a depth-first stack pops in order)
    while stack:
        budget -= 1
        if budget < 0:
            return None
        item, depth = stack.pop()
        if not _container(item):
            continue
        deepest = max(deepest, depth)
        del on_path[depth - 1 :]
        if id(item) in on_path:
            return None
        on_path.append(id(item))
        stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _format(path) -> str:
    segments: list = []
    while path is not None:
        if len(path) == 1:
            segments.append(path[0])
            break
        path, segment = path
        segments.append(f"[{_short(segment)}]")
    segments.reverse()
    if not segments:
        return "the message"
    if len(segments) > _PATH_SHOWN:
        hidden = len(segments) - _PATH_SHOWN
        segments = [*segments[: _PATH_SHOWN - 3], f"…({hidden:,} more)…", *segments[-3:]]
    return "".join(str(s) for s in segments)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
