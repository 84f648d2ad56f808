"""``python -m worker --check-loaders``: import each mode's loader module
and resolve its function, calling nothing, for ``gpuvisor check-config``.

It runs as a worker would (the same command, ``-P``, ``PYTHONSAFEPATH=1``,
in /, with ``loader_path``), so a loader it finds is one a worker finds,
and it touches no GPU: the command that starts it hides every device
(``CUDA_VISIBLE_DEVICES=""``), and ``load`` is never called. It reads
``{"loaders": {MODE: LOADER}, "loader_path": [FOLDER, ...]}`` as JSON on
stdin and writes ``{MODE: {"ok": true} | {"ok": false, "error": TEXT}}``
as JSON on stdout. What a module prints while it is imported goes to
stderr, so it cannot spoil the report.
"""

from __future__ import annotations

import os
import sys
from typing import Any

FLAG = "--check-loaders"


def check(loaders: dict[str, str], folders: list[str]) -> dict[str, dict[str, Any]]:
    from worker.loader import failure_text, resolve

    report: dict[str, dict[str, Any]] = {}
    for mode, loader in loaders.items():
        try:
            resolve(loader, folders)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - whatever the import raised is the finding
            report[mode] = {"ok": False, "error": failure_text(loader, exc)}
        else:
            report[mode] = {"ok": True}
    return report


def main() -> int:
    import json

    report_fd = os.dup(1)
    os.dup2(2, 1)  # a module that prints at import writes to stderr, not into the report
    from gpuvisor.packages import foreign_package

    problem = foreign_package(("worker", "protocol"))
    if problem is not None:
        print(f"gpuvisor worker: cannot check loaders: {problem}", file=sys.stderr)
        return 1
    request = json.load(sys.stdin)
    report = check(dict(request["loaders"]), list(request.get("loader_path", [])))
    with os.fdopen(report_fd, "w") as out:
        json.dump(report, out)
    return 0
