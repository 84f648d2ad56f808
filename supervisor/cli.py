"""The ``gpuvisor`` command."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpuvisor", description="Keep GPU work in a process you can kill.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every worker transition")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the five-minute tour on the built-in config")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s gpuvisor %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        from supervisor.tour import run_tour

        return run_tour()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
