"""``make bench``: run every benchmark, print one table, write results.json
and draw its charts (docs/img/bench/). ``python -m bench NAME [NAME ...]``
runs some of them alone."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import traceback

from bench.report import RESULTS, failed_row, print_table, progress, write

# name -> module in bench/ with a ``run() -> list[Row]``; the order of a full run.
SUITES = [
    "roundtrip",
    "throughput",
    "arrays",
    "traffic",
    "placement",
    "lifecycle",
    "standby",
    "footprint",
    "drain",
    "daemon",
    "flood",
    "http",
    "door",
]


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    names = argv or SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown benchmark {unknown}; choose from {SUITES}", file=sys.stderr)
        return 2
    rows = []
    failed = False
    started = time.monotonic()
    for name in names:
        progress(f"running {name} ...")
        t = time.monotonic()
        try:
            rows.extend(importlib.import_module(f"bench.{name}").run())
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others' figures
            traceback.print_exc()
            rows.append(failed_row(name, exc))
            failed = True
        progress(f"{name} done in {time.monotonic() - t:.1f}s")
    seconds = time.monotonic() - started
    print_table(rows)
    print(f"run time: {seconds:.1f}s ({', '.join(names)})")
    write(rows, seconds, names)
    drawn = draw_charts()
    return 1 if failed or not drawn else 0


def draw_charts() -> bool:
    """The charts of what results.json now holds. Without matplotlib (the dev
    extra) the figures are still written and the run still counts; a chart
    that breaks fails the run, so a broken chart is not committed unseen."""
    try:
        from bench.charts import DOCS_IMAGES, draw_all
    except ImportError as exc:
        print(f"charts not drawn: {exc} (matplotlib comes with the dev extra)")
        return True
    try:
        draw_all(RESULTS, DOCS_IMAGES)
    except Exception:  # noqa: BLE001 - the figures are written: say what broke and fail the run
        traceback.print_exc()
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
