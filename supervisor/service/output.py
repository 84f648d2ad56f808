"""What the CLI prints: for people, results as indented JSON with arrays
summarised (dtype, shape, first values), records as aligned ``key: value``
lines with sizes in KiB/MiB/GiB and seconds rounded; for programs
(``--json``), one line of JSON with every value."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from supervisor.service.progress import describe

if TYPE_CHECKING:
    from protocol import GpuvisorError


def show_stream(args: argparse.Namespace, stream: Any) -> None:
    """Chunks as they come: a JSON line each with --json; otherwise a
    token's text (a map with a "text" string) as plain text, anything else
    as a line of JSON. A text left without its newline gets one, so the
    result starts on a line of its own, and nothing else adds one."""
    open_line = False
    for chunk in stream:
        if args.json:
            print(_json({"chunk": chunk}), flush=True)
        elif isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
            if chunk["text"]:
                print(chunk["text"], end="", flush=True)
                open_line = not chunk["text"].endswith("\n")
        else:
            if open_line:
                print()
            print(_json(chunk), flush=True)
            open_line = False
    if open_line:
        print()


def _json(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_plain, **kwargs)


def _is_array(obj: Any) -> bool:
    return hasattr(obj, "dtype") and hasattr(obj, "shape") and hasattr(obj, "tolist")


def _plain(obj: Any) -> Any:
    """JSON for what msgpack carries and JSON does not: bytes as hex, arrays as nested lists."""
    if isinstance(obj, bytes):
        return obj.hex()
    if _is_array(obj):
        return obj.tolist()
    return repr(obj)


def _number(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4f}" if x == 0 or 1e-3 <= abs(x) < 1e6 else f"{x:.4g}"
    return str(x)


def _preview(a: Any) -> str:
    """An array's first values: two and the last of the innermost axis, the
    first entry of each outer one."""
    if a.ndim == 0:
        return _number(a.item())
    if a.shape[0] == 0:
        return "[]"
    if a.ndim == 1:
        values = a.tolist()
        shown = (
            [_number(x) for x in values]
            if len(values) <= 4
            else [*map(_number, values[:2]), "...", _number(values[-1])]
        )
        return "[" + ", ".join(shown) + "]"
    return "[" + _preview(a[0]) + (", ...]" if a.shape[0] > 1 else "]")


def _array_text(a: Any) -> str:
    """``float32 array (2, 384): [[-0.0628, 0.0550, ..., 0.0301], ...]``:
    a person wants the shape, not 768 lines of floats (--json has them all)."""
    return f"{a.dtype} array {tuple(a.shape)}: {_preview(a)}"


def _human(value: Any) -> str:
    """A result for people: JSON, with each array as its summary in place."""
    if _is_array(value):
        return _array_text(value)
    arrays: list[str] = []

    def placeholder(obj: Any) -> Any:
        if _is_array(obj):
            arrays.append(_array_text(obj))
            return f"\0{len(arrays) - 1}\0"
        if isinstance(obj, bytes) and len(obj) > 32:
            return f"{len(obj)} bytes: {obj[:32].hex()}..."
        return _plain(obj)

    text = json.dumps(value, default=placeholder, indent=2)
    for i, summary in enumerate(arrays):
        text = text.replace(json.dumps(f"\0{i}\0"), summary)
    return text


def bytes_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:g} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _field(key: str, value: Any) -> str:
    """One status value, read by a person: sizes in KiB/MiB/GiB, seconds
    rounded, lists joined, nothing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and key.endswith("_bytes"):
        return bytes_text(value)
    if isinstance(value, (int, float)) and (key.endswith(("seconds", "_s")) or isinstance(value, float)):
        return f"{value:.3f}s" if key.endswith(("seconds", "_s")) else f"{value:.3f}"
    if isinstance(value, list) and all(not isinstance(x, (dict, list)) for x in value):
        return ", ".join(map(str, value)) or "-"
    if value == {}:
        return "-"
    if isinstance(value, (dict, list)):
        return _json(value)
    return str(value)


def _record(value: dict, indent: str = "") -> list[str]:
    """A map as aligned ``key: value`` lines; a nested map as its own
    block, indented under its key, and a list of maps (``devices``) as one
    block per map, each opened by a ``-`` as in YAML: one JSON line of a
    whole device's status is not read by anyone."""
    width = max((len(str(key)) for key in value), default=0) + 1
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            lines.extend(_record(item, indent + "  "))
        elif isinstance(item, list) and item and all(isinstance(x, dict) and x for x in item):
            lines.append(f"{indent}{key}:")
            for entry in item:
                block = _record(entry, indent + "    ")
                lines.append(f"{indent}  - {block[0].lstrip()}")
                lines.extend(block[1:])
        else:
            lines.append(f"{indent}{str(key) + ':':<{width}} {_field(str(key), item)}")
    return lines


def _modes_table(modes: dict) -> list[str]:
    """One line per mode: name, loaded or not, loader, tasks (known once the
    mode has loaded)."""
    rows = [("MODE", "LOADED", "LOADER", "TASKS")]
    for name, mode in modes.items():
        tasks = mode.get("tasks")
        loaded = "yes" if mode.get("loaded") else "-"
        known = ", ".join(tasks) if tasks is not None else "(known once loaded)"
        rows.append((name, loaded, str(mode.get("loader")), known))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]


def show_http_socket(status: Mapping[str, Any]) -> bool:
    """The path of the HTTP listener's unix socket, alone on stdout, so a
    shell can hand it to ``curl --unix-socket`` wherever the runtime folder
    is; False, with the reason on stderr, when the daemon has none."""
    listening = status.get("http") or []
    for address in listening:
        if isinstance(address, str) and address.startswith("unix:"):
            print(address.removeprefix("unix:"))
            return True
    why = f"it listens on {', '.join(map(str, listening))} only" if listening else "it serves no HTTP ([http])"
    print(f"gpuvisor: the daemon's HTTP listener has no unix socket: {why}", file=sys.stderr)
    return False


def show(args: argparse.Namespace, value: Any) -> None:
    if args.json:
        print(_json({"ok": True, "value": value}))
    elif args.command in ("status", "switch", "restart") and isinstance(value, dict):
        print("\n".join(_record(value)))
    elif args.command == "modes" and isinstance(value, dict):
        print("\n".join(_modes_table(value)))
    elif args.command == "stop":
        print(stopped_line(value))
    else:
        print(_human(value))


def fail(args: argparse.Namespace, exc: GpuvisorError) -> None:
    if args.json:
        print(_json({"ok": False, "error": {"type": type(exc).__name__, **exc.to_wire()}}))
    else:
        print(f"gpuvisor: {type(exc).__name__}: {exc}", file=sys.stderr)


def stopped_line(value: Any) -> str:
    """``stopped: 3 jobs finished, 2 cancelled``; plain ``stopped`` when the
    daemon did not say (it went before its last event reached this client)."""
    if isinstance(value, dict) and value.get("finished") is not None:
        return describe({"event": "stopped", "finished": value["finished"], "cancelled": value.get("cancelled") or 0})
    return "stopped"
