"""The ``gpuvisor`` command.

Exit codes: 0 ok; 1 the job or switch failed, or another daemon already
serves the endpoint; 2 usage; 3 the daemon is not running (nothing
answered); 6 bad configuration: the file (the message names the file, the
line and the key) or an endpoint that is unsafe or unusable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_CONFIG = 0, 1, 2, 3, 6


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuvisor", description="Keep GPU work in a process you can kill.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every worker transition")
    parser.add_argument("--endpoint", help="the daemon's endpoint (default: ipc:// in the runtime directory)")
    parser.add_argument("--config", help="TOML config file (serve reads it; clients take [daemon] endpoint from it)")
    parser.add_argument(
        "--daemon-timeout",
        type=float,
        default=10.0,
        dest="daemon_timeout",
        help="seconds of silence before the daemon counts as down",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # --json also after the command (``gpuvisor status --json``); SUPPRESS keeps
    # the subcommand from resetting a --json given before it.
    either_side = argparse.ArgumentParser(add_help=False)
    either_side.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: commands.add_parser(name, parents=[either_side], **kw)  # noqa: E731
    add("serve", help="run the daemon in the foreground")
    submit = add("submit", help="run one job and print its result")
    submit.add_argument("task")
    submit.add_argument("payload", nargs="?", default="null", help="the payload as JSON (default: null)")
    submit.add_argument("--mode", help="switch to this mode first if needed")
    submit.add_argument("--timeout", "--job-timeout", type=float, dest="job_timeout", help="seconds the job may run")
    submit.add_argument("--retries", type=int, default=0, help="re-run this many times if the worker dies")
    submit.add_argument(
        "--stream", action="store_true", help="print each chunk as it comes (one JSON line each with --json)"
    )
    switch = add("switch", help="switch the daemon to a mode")
    switch.add_argument("mode")
    restart = add("restart", help="replace the worker with a fresh one (clears 'failed')")
    restart.add_argument("mode", nargs="?")
    add("status", help="what the daemon is doing")
    stop = add("stop", help="stop the daemon (after draining its queue)")
    stop.add_argument("--no-drain", action="store_true", help="cancel queued jobs instead of running them")
    add("demo", help="the five-minute tour, in this process (no daemon)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # usage errors exit 2 here
    from supervisor.logsetup import configure_logging

    configure_logging(verbose=args.verbose)
    from protocol import DaemonUnavailable, GpuvisorError
    from supervisor.config import ConfigError
    from supervisor.endpoint import EndpointError, EndpointInUse

    try:
        if args.command == "demo":
            from supervisor.tour import run_tour

            return run_tour()
        if args.command == "serve":
            import zmq

            from supervisor.daemon import Daemon

            try:
                return Daemon(args.config, args.endpoint).run()
            except (zmq.ZMQError, OSError) as exc:  # a port in use, a path we may not write ...
                print(f"gpuvisor: cannot serve: {exc}", file=sys.stderr)
                return EXIT_CONFIG
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


def _endpoint(args: argparse.Namespace) -> str | None:
    if args.endpoint:
        return args.endpoint
    if args.config:
        from supervisor.config import load

        return load(args.config).daemon.endpoint or None
    return None


def _client_command(args: argparse.Namespace) -> int:
    from supervisor.client import Client

    if args.command == "submit":
        try:
            payload = json.loads(args.payload)
        except json.JSONDecodeError as exc:
            print(f"gpuvisor submit: the payload is not JSON: {exc}", file=sys.stderr)
            return EXIT_USAGE
    with Client(_endpoint(args), timeout=args.daemon_timeout) as client:
        if args.command == "submit" and args.stream:
            stream = client.submit(args.task, payload, mode=args.mode, timeout=args.job_timeout, stream=True)
            for chunk in stream:
                _show_chunk(args, chunk)
            if not args.json:
                print()  # end the streamed text's line
            value = stream.result()
        elif args.command == "submit":
            value = client.submit(
                args.task, payload, mode=args.mode, timeout=args.job_timeout, retries=args.retries
            ).result()
        elif args.command == "switch":
            value = client.switch_mode(args.mode).result()
        elif args.command == "restart":
            value = client.restart(args.mode).result()
        elif args.command == "status":
            value = client.status()
        else:  # stop
            value = client.shutdown(drain=not args.no_drain)
    _show(args, value)
    return EXIT_OK


def _show_chunk(args: argparse.Namespace, chunk: Any) -> None:
    """A chunk as it comes: a JSON line with --json; otherwise a token's text
    (a map with a "text" string) as plain text, anything else as JSON."""
    if args.json:
        print(_json({"chunk": chunk}), flush=True)
    elif isinstance(chunk, dict) and isinstance(chunk.get("text"), str):
        print(chunk["text"], end="", flush=True)
    else:
        print(_json(chunk), flush=True)


def _json(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, default=_plain, **kwargs)


def _plain(obj: Any) -> Any:
    """JSON for what msgpack carries and JSON does not: bytes as hex, arrays as nested lists."""
    if isinstance(obj, bytes):
        return obj.hex()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return repr(obj)


def _show(args: argparse.Namespace, value: Any) -> None:
    if args.json:
        print(_json({"ok": True, "value": value}))
    elif args.command == "status" and isinstance(value, dict):
        for key, item in value.items():
            print(f"{key:>14}: {item if item is not None else '-'}")
    else:
        print(_json(value, indent=2))


def _fail(args: argparse.Namespace, exc: Exception) -> None:
    if args.json:
        print(_json({"ok": False, "error": {"type": type(exc).__name__, **exc.to_wire()}}))
    else:
        print(f"gpuvisor: {type(exc).__name__}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
