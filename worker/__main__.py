"""Entry point: ``python -m worker --endpoint E --gen N --parent-pid P``, or
``--standby`` to become a warm spare (see ``supervisor/engine/standby.py`` and
``worker/standby.py``)."""

from __future__ import annotations

import argparse
import os
import sys


def _standby(ready_fd: int | None, preload_fd: int | None) -> tuple[int, float, bool]:
    """Import what the supervisor names in ``preload_fd`` (comma-separated
    modules: the modes' ``preload`` lists, then what earlier workers
    imported, in their order), touching no GPU: importing torch does not
    initialise CUDA. The imports run in a thread at the lowest CPU priority
    (``worker.standby``), while this thread waits for a line on stdin,
    ``"GEN HEARTBEAT_INTERVAL"``, and becomes that worker. EOF: not needed,
    exit 0 (at once, even mid-import). Returns the generation, the interval,
    and whether to start afresh instead (an import under way that only the
    lowest priority may finish).

    ``ready_fd`` gets one byte now, once this process dies with its
    supervisor (PDEATHSIG is armed: the supervisor may stop it with SIGSTOP
    from here on, as SIGKILL still reaches a stopped process), and one when
    the imports are done. It writes nothing to stderr: what a worker writes
    there is quoted in its crash reports, and a standby's history is the
    supervisor's to log."""
    from worker.standby import Importer

    _tell(ready_fd)
    preload = ""
    if preload_fd is not None:
        with os.fdopen(preload_fd, "rb") as names:
            preload = names.read().decode().strip()
    importer = Importer(list(filter(None, preload.split(","))), lambda: _tell(ready_fd))
    importer.start()
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    afresh = not importer.stop()
    if ready_fd is not None:
        os.close(ready_fd)
    gen, interval = line.split()
    return int(gen), float(interval), afresh


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
    from worker.loader_check import FLAG

    if sys.argv[1:] == [FLAG]:  # gpuvisor check-config: import the loaders, load nothing
        from worker.loader_check import main as check_loaders

        raise SystemExit(check_loaders())
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
        gen, interval, afresh = _standby(args.ready_fd, args.preload_fd)
        exit_if_orphaned(args.parent_pid)
        if afresh:  # the same process, pipes and process group: to the supervisor, still the spare it took
            argv = ["--endpoint", args.endpoint, "--gen", str(gen), "--parent-pid", str(args.parent_pid)]
            os.execv(
                sys.executable, [sys.executable, "-P", "-m", "worker", *argv, "--heartbeat-interval", repr(interval)]
            )

    from worker.runtime import run

    raise SystemExit(run(args.endpoint, gen, args.parent_pid, interval))


if __name__ == "__main__":
    main()
