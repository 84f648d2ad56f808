"""Entry point: ``python -m worker --endpoint E --gen N --parent-pid P``, or
``--standby`` to become a warm spare (see ``supervisor/standby.py``)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys


def _standby(ready_fd: int | None, preload_fd: int | None) -> tuple[int, float]:
    """Import what the supervisor names in ``preload_fd`` (comma-separated
    modules: the modes' ``preload`` lists, then what earlier workers
    imported, in their order), touching no GPU: importing torch does not
    initialise CUDA. Then wait for a line on stdin, ``"GEN
    HEARTBEAT_INTERVAL"``, and become that worker. EOF: not needed, exit 0.

    ``ready_fd`` gets one byte now, once this process dies with its
    supervisor (PDEATHSIG is armed: the supervisor may stop it with SIGSTOP
    from here on, as SIGKILL still reaches a stopped process), and one when
    the imports are done. It writes nothing to stderr: what a worker writes
    there is quoted in its crash reports, and a standby's history is the
    supervisor's to log."""
    _tell(ready_fd)
    preload = ""
    if preload_fd is not None:
        with os.fdopen(preload_fd, "rb") as names:
            preload = names.read().decode().strip()
    for name in filter(None, preload.split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a failed preload only costs the speed-up
            pass
    import worker.runtime  # noqa: F401 - what every worker imports next: ready before its generation comes

    if ready_fd is not None:
        _tell(ready_fd)
        os.close(ready_fd)
    line = sys.stdin.readline()
    if not line:
        raise SystemExit(0)
    gen, interval = line.split()
    return int(gen), float(interval)


def _tell(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, b"1")
    except OSError:
        pass  # taken into service before the imports were done: nobody is asking any more


def _stdout_into_stderr() -> None:
    """What the worker prints goes into its stderr pipe, line by line: the
    supervisor passes that on within a budget and keeps its last lines for
    crash reports. Its stdout is the supervisor's stderr itself, where a
    handler printing in a loop would go unbounded, and a line printed just
    before a crash would die in the buffer."""
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]


def main() -> None:
    _stdout_into_stderr()
    from gpuvisor.packages import foreign_package

    problem = foreign_package(("worker", "protocol"))  # what a worker imports: not supervisor
    if problem is not None:
        raise SystemExit(f"gpuvisor worker: cannot start: {problem}")
    parser = argparse.ArgumentParser(prog="python -m worker", description="gpuvisor worker process")
    parser.add_argument("--endpoint", required=True, help="the supervisor's ZeroMQ endpoint")
    parser.add_argument("--gen", type=int, help="generation number of this worker (not with --standby)")
    parser.add_argument("--parent-pid", type=int, required=True, help="pid of the supervisor")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    parser.add_argument(
        "--standby", action="store_true", help="read modules to preload, then 'GEN INTERVAL', from stdin"
    )
    parser.add_argument("--ready-fd", type=int, help="with --standby: write a byte here once the preload is done")
    parser.add_argument("--preload-fd", type=int, help="with --standby: read the modules to import from here")
    args = parser.parse_args()
    if args.gen is None and not args.standby:
        parser.error("--gen is required (unless --standby)")

    # Before anything slow: an orphan must never get as far as touching a GPU.
    from worker.lifeline import die_with_parent, exit_if_orphaned

    die_with_parent(args.parent_pid)
    gen, interval = args.gen, args.heartbeat_interval
    if args.standby:
        gen, interval = _standby(args.ready_fd, args.preload_fd)
        exit_if_orphaned(args.parent_pid)

    from worker.runtime import run

    raise SystemExit(run(args.endpoint, gen, args.parent_pid, interval))


if __name__ == "__main__":
    main()
