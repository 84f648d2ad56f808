"""The ``gpuvisor`` command.

Exit codes: 0 ok; 1 the job or switch failed, or another daemon already
serves the endpoint; 2 usage; 3 the daemon is not running (nothing
answered); 6 bad configuration: the file (the message names the file, the
line and the key; for ``reload``, the daemon's file, which it then keeps
running without), an endpoint that is unsafe or unusable (a client's
runtime folder another user made, say), or a secret file others could
change; 130 a
``submit`` interrupted (Ctrl-C), its job cancelled on the daemon (a queued
one never runs, a stream stops at its next chunk). ``events`` and ``top``
end with 0 when interrupted: watching until Ctrl-C is how they are used.

``switch``, ``restart``, ``stop`` and a ``submit`` that waits show their
progress on stderr (live on a terminal, a line per phase in a pipe); stdout
holds the result alone.

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

from supervisor.service import output

if TYPE_CHECKING:
    from supervisor.client import Client

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 3, 6, 130

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
    add(
        "--daemon-timeout",
        type=_positive_seconds,
        dest="daemon_timeout",
        metavar="SECONDS",
        help="seconds of silence before the daemon counts as down (default 10)",
    )
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
    serve = add("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--ui",
        metavar="HOST:PORT",
        help="also serve the HTTP door (and its status page, /ui) on this loopback address, for a browser",
    )
    submit = add("submit", help="run one job and print its result")
    submit.add_argument("task")
    submit.add_argument("payload", nargs="?", default="null", help="the payload as JSON (default: null)")
    submit.add_argument("--mode", help="switch to this mode first if needed")
    submit.add_argument(
        "--timeout",
        "--job-timeout",
        type=_job_seconds,
        dest="job_timeout",
        metavar="SECONDS",
        help="seconds to wait for the job; 0 or none: the daemon's job_timeout, a ceiling; "
        "less gives up on it while the worker finishes it",
    )
    submit.add_argument("--retries", type=_whole, default=0, help="re-run this many times if the worker dies")
    submit.add_argument(
        "--stream", action="store_true", help="print each chunk as it comes (one JSON line each with --json)"
    )
    switch = add("switch", help="switch the daemon to a mode")
    switch.add_argument("mode")
    switch.add_argument("--device", help="with several devices: the one to switch (default: the daemon chooses)")
    restart = add("restart", help="replace the worker with a fresh one (clears 'failed')")
    restart.add_argument("mode", nargs="?")
    restart.add_argument("--device", help="with several devices: the one to restart (default: a failed one first)")
    unload = add("unload", help="stop the worker and free its memory; the next job that needs the mode loads it again")
    unload.add_argument("--device", help="with several devices: the one to free (default: every device)")
    add("reload", help="read the configuration file again and say what changed (as SIGHUP does)")
    status = add("status", help="what the daemon is doing")
    status.add_argument(
        "--http-socket",
        action="store_true",
        help="print only the path of the HTTP listener's unix socket (for curl --unix-socket)",
    )
    add("modes", help="the modes the daemon serves: loader, whether loaded, tasks")
    add("metrics", help="the daemon's metrics in the Prometheus text format (for a textfile collector)")
    stop = add("stop", help="stop the daemon (after draining its queue); returns once it has stopped")
    stop.add_argument("--no-drain", action="store_true", help="cancel queued jobs instead of running them")
    stop.add_argument(
        "--drain-timeout",
        type=_positive_seconds,
        metavar="SECONDS",
        help="cancel what has not run after this long (default: the daemon's drain_timeout)",
    )
    add("events", help="follow the daemon's events (switch phases, workers, drains) until Ctrl-C")
    top = add("top", help="the status page in the terminal: devices, queue, switches, memory, errors, refreshed")
    top.add_argument(
        "--interval", type=_positive_seconds, default=1.0, metavar="SECONDS", help="wait between frames (default 1)"
    )
    top.add_argument("--once", action="store_true", help="one frame, then exit (as when stdout is not a terminal)")
    add("demo", help="the five-minute tour, in this process (no daemon)")
    check = add("check-config", help="check a config file and import its loaders in a throwaway worker (no load)")
    check.add_argument("file", nargs="?", help="the TOML file (default: --config, else the built-in config)")
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
    from supervisor.client.endpoint import UnsafeRuntimeDir
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
        if args.command == "check-config":
            from supervisor.service.check_config import run as check_config

            return check_config(args)
        return _client_command(args)
    except ConfigError as exc:
        print(f"gpuvisor: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except EndpointError as exc:  # in use: 1; unsafe or unusable as configured: 6
        print(f"gpuvisor: cannot serve: {exc}", file=sys.stderr)
        return EXIT_FAILED if isinstance(exc, EndpointInUse) else EXIT_CONFIG
    except UnsafeRuntimeDir as exc:  # before DaemonUnavailable, its base: a daemon may even answer there
        print(f"gpuvisor: cannot connect: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DaemonUnavailable as exc:
        output.fail(args, exc)
        return EXIT_NO_DAEMON
    except GpuvisorError as exc:
        output.fail(args, exc)
        return EXIT_FAILED


def _serve(args: argparse.Namespace) -> int:
    import zmq

    from supervisor.service.daemon import Daemon

    try:
        return Daemon(args.config, args.endpoint, page=args.ui).run()
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
    from supervisor.client.endpoint import client_default_endpoint

    return client_default_endpoint()


def _client_command(args: argparse.Namespace) -> int:
    from protocol import DaemonUnavailable
    from supervisor.client import Client
    from supervisor.client.endpoint import unreachable
    from supervisor.service import follow

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
            value = _submit(args, client, payload)
            if value is _INTERRUPTED:
                return EXIT_INTERRUPTED
        elif args.command == "unload":
            value = follow.unload(client, args.device)
        elif args.command == "reload":
            return _reload(args, client)
        elif args.command in ("switch", "restart"):
            value = follow.switch(client, args.mode, args.device, restart=args.command == "restart")
        elif args.command == "events":
            try:
                follow.events(client, args.json)
            except KeyboardInterrupt:
                pass
            return EXIT_OK
        elif args.command == "top":
            from supervisor.service import top

            return top.run(client, args)
        elif args.command == "status":
            value = client.status()
            if args.http_socket:
                return EXIT_OK if output.show_http_socket(value) else EXIT_FAILED
        elif args.command == "modes":
            value = client.modes()
        elif args.command == "metrics":
            sys.stdout.write(client.metrics())  # the exposition as it is, with or without --json
            return EXIT_OK
        else:  # stop
            value = follow.stop(client, drain=not args.no_drain, timeout=args.drain_timeout)
    output.show(args, value)
    return EXIT_OK


def _reload(args: argparse.Namespace, client: Client) -> int:
    """What changed, or why the daemon kept its file (exit 6, as for any
    configuration mistake: the daemon goes on with the last good one)."""
    from supervisor.service.reloading import describe

    report = client.reload()
    if args.json:
        output.show(args, report)
    elif report["reloaded"]:
        print(describe(report))
    if not report["reloaded"]:
        print(f"gpuvisor: the daemon {describe(report)}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


_INTERRUPTED = object()


def _submit(args: argparse.Namespace, client: Client, payload: Any) -> Any:
    """The job's result, its chunks shown as they come with ``--stream``.
    Ctrl-C cancels the job on the daemon, waiting for its word, before the
    client closes: a queued job never runs, a stream stops at its next
    chunk (one that runs and does not stream goes on)."""
    timeout = args.job_timeout  # None: the config's job_timeout; 0: none, as job_timeout = 0
    job: Any = None  # the job's Future, or its JobStream
    try:
        if args.stream:
            job = client.submit(args.task, payload, mode=args.mode, timeout=timeout, stream=True)
            output.show_stream(args, job)
            return job.result()
        job = client.submit(args.task, payload, mode=args.mode, timeout=timeout, retries=args.retries)
        from supervisor.service import follow

        return follow.job(client, job, args.mode)
    except KeyboardInterrupt:
        cancelled = False
        if job is not None:
            try:
                cancelled = job.cancel()
            except KeyboardInterrupt:  # a second Ctrl-C: leave now
                pass
            except Exception as exc:  # noqa: BLE001 - the daemon went away meanwhile: say so, exit all the same
                print(f"gpuvisor: could not cancel the job: {exc}", file=sys.stderr)
        if cancelled:
            fate = "the job was cancelled"
        elif job is None:
            fate = "the job was not sent"
        elif getattr(job, "future", job).done():
            fate = "the job had already ended"
        else:
            fate = "the job runs on (a job that does not stream cannot be stopped once it runs)"
        print(f"gpuvisor: interrupted; {fate}", file=sys.stderr)
        return _INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
