"""Entry point: ``python -m worker --endpoint E --gen N --parent-pid P``."""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description="gpuvisor worker process")
    parser.add_argument("--endpoint", required=True, help="the supervisor's ZeroMQ endpoint")
    parser.add_argument("--gen", type=int, required=True, help="generation number of this worker")
    parser.add_argument("--parent-pid", type=int, required=True, help="pid of the supervisor")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds between heartbeats")
    args = parser.parse_args()

    # Before anything slow: an orphan must never get as far as touching a GPU.
    from worker.lifeline import die_with_parent

    die_with_parent(args.parent_pid)

    from worker.runtime import run

    raise SystemExit(run(args.endpoint, args.gen, args.parent_pid, args.heartbeat_interval))


if __name__ == "__main__":
    main()
