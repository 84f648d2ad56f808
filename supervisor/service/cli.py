"""The ``gpuvisor`` command.

Exit codes: 0 ok; 1 the job or switch failed, or another daemon already
serves the endpoint; 2 usage; 3 the daemon is not running (nothing
answered); 6 bad configuration: the file (the message names the file, the
line and the key) or an endpoint that is unsafe or unusable.

The options every command shares may stand before or after the command
(``gpuvisor serve --config F`` and ``gpuvisor --config F serve``), because
a systemd unit, a shell history and the docs each write it their own way;
given on both sides, the one after the command wins.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protocol import GpuvisorError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_CONFIG = 0, 1, 2, 3, 6

# The shared options' values when given on neither side of the command.
_SHARED_DEFAULTS = {"verbose": False, "endpoint": None, "config": None, "daemon_timeout": 10.0, "json": False}


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds {'>= 0' if zero else '> 0'}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def _job_seconds(text: str) -> float:
    return _seconds(text, zero=True)


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 0")
    return value


def _shared_options() -> argparse.ArgumentParser:
    """The options of every command. SUPPRESS as the default: an option not
    given leaves no value, so the subcommand's copy does not overwrite one
    given before the command; the defaults are filled in after parsing."""
    shared = argparse.ArgumentParser(add_help=False)
    group = shared.add_argument_group("options of every command (before or after it)")
    add = lambda *names, **kw: group.add_argument(*names, default=argparse.SUPPRESS, **kw)  # noqa: E731
    add("-v", "--verbose", action="store_true", help="log every worker transition")
    add("--endpoint", help="the daemon's endpoint (default: ipc:// in the runtime directory)")
    add("--config", help="TOML config file (serve reads it; clients take [daemon] endpoint from it)")
    add("--daemon-timeout", type=_positive_seconds, dest="daemon_timeout", metavar="SECONDS",
        help="seconds of silence before the daemon counts as down (default 10)")  # fmt: skip
    add("--json", action="store_true", help="machine-readable output")
    return shared


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuvisor")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The command's parser, and its submit subcommand's (for the checks
    that take more than one option)."""
    shared = _shared_options()
    parser = argparse.ArgumentParser(
        prog="gpuvisor", description="Keep GPU work in a process you can kill.", parents=[shared]
    )
    parser.add_argument("--version", action="version", version=f"gpuvisor {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: commands.add_parser(name, parents=[shared], **kw)  # noqa: E731
    add("serve", help="run the daemon in the foreground")
    submit = add("submit", help="run one job and print its result")
    submit.add_argument("task")
    submit.add_argument("payload", nargs="?", default="null", help="the payload as JSON (default: null)")
    submit.add_argument("--mode", help="switch to this mode first if needed")
    submit.add_argument("--timeout", "--job-timeout", type=_job_seconds, dest="job_timeout", metavar="SECONDS",
                        help="seconds the job may run; 0: no limit (default: the daemon's job_timeout)")  # fmt: skip
    submit.add_argument("--retries", type=_whole, default=0, help="re-run this many times if the worker dies")
    submit.add_argument(
        "--stream", action="store_true", help="print each chunk as it comes (one JSON line each with --json)"
    )
    switch = add("switch", help="switch the daemon to a mode")
    switch.add_argument("mode")
    restart = add("restart", help="replace the worker with a fresh one (clears 'failed')")
    restart.add_argument("mode", nargs="?")
    add("status", help="what the daemon is doing")
    add("modes", help="the modes the daemon serves: loader, whether loaded, tasks")
    stop = add("stop", help="stop the daemon (after draining its queue); returns once it has stopped")
    stop.add_argument("--no-drain", action="store_true", help="cancel queued jobs instead of running them")
    stop.add_argument("--drain-timeout", type=_positive_seconds, metavar="SECONDS",
                      help="cancel what has not run after this long (default: the daemon's drain_timeout)")  # fmt: skip
    add("demo", help="the five-minute tour, in this process (no daemon)")
    return parser, submit


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser, submit = _parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    for key, value in _SHARED_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.command == "submit" and args.stream and args.retries:
        submit.error("--stream with --retries: a streamed job cannot be retried (its reader would see chunks twice)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from supervisor.service.logsetup import configure_logging

    configure_logging(verbose=args.verbose)
    from protocol import DaemonUnavailable, GpuvisorError
    from supervisor.config import ConfigError
    from supervisor.service.front import EndpointError, EndpointInUse

    try:
        if args.command == "demo":
            from supervisor.service.tour import run_tour

            if not args.verbose:
                _quiet_demo()
            return run_tour()
        if args.command == "serve":
            return _serve(args)
        return _client_command(args)
    except ConfigError as exc:
        print(f"gpuvisor: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EndpointError as exc:  # in use: 1; unsafe or unusable as configured: 6
        print(f"gpuvisor: cannot serve: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, EndpointInUse) else EXIT_CONFIG
    except DaemonUnavailable as exc:
        _fail(args, exc)
        return EXIT_NO_DAEMON
    except GpuvisorError as exc:
        _fail(args, exc)
        return EXIT_FAILED


def _serve(args: argparse.Namespace) -> int:
    import zmq

    from supervisor.service.daemon import Daemon

    try:
        return Daemon(args.config, args.endpoint).run()
    except (zmq.ZMQError, OSError) as exc:  # a port in use, a path we may not write ...
        print(f"gpuvisor: cannot serve: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _quiet_demo() -> None:
    """The tour's own lines, not interleaved with INFO records or the
    libraries' deprecation chatter: warnings and errors still show (stderr).
    The environment reaches the workers, where the models run."""
    import logging
    import warnings

    for name in ("", "gpuvisor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    if args.config:
        from supervisor.config import load

        configured = load(args.config).daemon.endpoint
        if configured:
            return configured
    from supervisor.client.endpoint import default_endpoint

    return default_endpoint()


def _client_command(args: argparse.Namespace) -> int:
    from protocol import DaemonUnavailable
    from supervisor.client import Client
    from supervisor.client.endpoint import unreachable

    if args.command == "submit":
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            print(f"gpuvisor submit: the payload is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    endpoint = _endpoint(args)
    why = unreachable(endpoint, args.daemon_timeout)  # "not running" at once, not after twice the timeout
    if why is not None:
        raise DaemonUnavailable(f"no daemon at {endpoint}: {why}; is `gpuvisor serve` running?")
    with Client(endpoint, timeout=args.daemon_timeout) as client:
        if args.command == "submit":
            timeout = args.job_timeout  # None: the config's job_timeout; 0: none, as job_timeout = 0
            if args.stream:
                stream = client.submit(args.task, payload, mode=args.mode, timeout=timeout, stream=True)
                _show_stream(args, stream)
                value = stream.result()
            else:
                value = client.submit(args.task, payload, mode=args.mode, timeout=timeout,
                                      retries=args.retries).result()  # fmt: skip
        elif args.command == "switch":
            value = client.switch_mode(args.mode).result()
        elif args.command == "restart":
            value = client.restart(args.mode).result()
        elif args.command == "status":
            value = client.status()
        elif args.command == "modes":
            value = client.modes()
        else:  # stop
            client.shutdown(drain=not args.no_drain, timeout=args.drain_timeout)
            value = {"stopped": True}
    _show(args, value)
    return EXIT_OK


# ---------------------------------------------------------------- output


def _show_stream(args: argparse.Namespace, stream: Any) -> None:
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


def _size(n: float) -> str:
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
        return _size(value)
    if isinstance(value, (int, float)) and (key.endswith(("seconds", "_s")) or isinstance(value, float)):
        return f"{value:.3f}s" if key.endswith(("seconds", "_s")) else f"{value:.3f}"
    if isinstance(value, list) and all(not isinstance(x, (dict, list)) for x in value):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, (dict, list)):
        return _json(value)
    return str(value)


def _record(value: dict, indent: str = "") -> list[str]:
    """A map as aligned ``key: value`` lines; a nested map as its own
    block, indented under its key."""
    width = max((len(str(key)) for key in value), default=0) + 1
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            lines.extend(_record(item, indent + "  "))
        else:
            lines.append(f"{indent}{str(key) + ':':<{width}} {_field(str(key), item)}")
    return lines


def _modes_table(modes: dict) -> list[str]:
    """One line per mode: name, loaded or not, loader, tasks (known once the
    mode has loaded)."""
    rows = [("MODE", "LOADED", "LOADER", "TASKS")]
    for name, mode in modes.items():
        tasks = mode.get("tasks")
        rows.append((name, "yes" if mode.get("loaded") else "-", str(mode.get("loader")),
                     ", ".join(tasks) if tasks is not None else "(known once loaded)"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]


def _show(args: argparse.Namespace, value: Any) -> None:
    if args.json:
        print(_json({"ok": True, "value": value}))
    elif args.command in ("status", "switch", "restart") and isinstance(value, dict):
        print("\n".join(_record(value)))
    elif args.command == "modes" and isinstance(value, dict):
        print("\n".join(_modes_table(value)))
    elif args.command == "stop":
        print("stopped")
    else:
        print(_human(value))


def _fail(args: argparse.Namespace, exc: GpuvisorError) -> None:
    if args.json:
        print(_json({"ok": False, "error": {"type": type(exc).__name__, **exc.to_wire()}}))
    else:
        print(f"gpuvisor: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
