"""The ``gpuvisor`` console script: the packages checked, then the command
(``supervisor.service.cli``)."""

from __future__ import annotations

import sys

from gpuvisor.packages import PACKAGES, foreign_package

EXIT_CONFIG = 6
"""The command's exit code for what a restart cannot fix (systemd's unit does
not restart on it); ``supervisor.service.cli`` cannot be imported to say so."""


def main(argv: list[str] | None = None) -> int:
    problem = foreign_package(PACKAGES)
    if problem is not None:
        print(f"gpuvisor: cannot start: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    from supervisor.service.cli import main as command

    return command(argv)
