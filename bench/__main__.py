"""``make bench``: run every benchmark, print one table, write results.json.
``python -m bench roundtrip`` or ``python -m bench lifecycle`` runs one."""

from __future__ import annotations

import logging
import sys

from bench import lifecycle, roundtrip
from bench.report import print_table, write

SUITES = {"roundtrip": roundtrip.run, "lifecycle": lifecycle.run}


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    names = argv or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown benchmark {unknown}; choose from {list(SUITES)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        print(f"running {name} ...", flush=True)
        rows.extend(SUITES[name]())
    print_table(rows)
    write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
