"""``gpuvisor check-config [FILE]``: is this configuration ready to serve?

The file is parsed as the daemon would parse it, then every mode's loader
module is imported, and its function looked up, in a throwaway worker: the
worker's own command, in /, with ``-P``, ``PYTHONSAFEPATH=1`` and
``loader_path``, so what it finds a real worker finds. No ``load`` is
called and no GPU is seen (``CUDA_VISIBLE_DEVICES=""``): checking a config
on a box that serves must not take memory from what runs there. Each
mistake is reported against the mode's ``loader`` line, so it reads like
the parser's own (file, line, key).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from supervisor.config import Config, ConfigError, load
from supervisor.config_where import Locator
from supervisor.engine.process import BUILT_IN_WORKER, WORKER_CWD, worker_env

EXIT_OK, EXIT_CONFIG = 0, 6
# The worker's flag for this check (worker/loader_check.py); the supervisor imports nothing of the worker.
_FLAG = "--check-loaders"
_BUILT_IN = "<built-in default.toml>"
_STDERR_TAIL = 2000  # characters of the checker's stderr quoted when it fails


def check(path: str | None) -> dict[str, Any]:
    """``{"ok", "file", "modes": {MODE: {"ok", "loader"[, "line", "error"]}}}``,
    with a top-level ``"error"`` when the file itself, or the checker, has
    the mistake. ``path`` None: the built-in config."""
    try:
        config = load(path)
        text = _text(path)
    except ConfigError as exc:
        return {"ok": False, "file": path or _BUILT_IN, "error": str(exc), "modes": {}}
    report: dict[str, Any] = {"ok": True, "file": config.source, "modes": {}}
    try:
        found = _import_loaders(config)
    except _CheckerFailed as exc:
        return {**report, "ok": False, "error": f"{config.source}: {exc}"}
    where = Locator(text, config.source)
    for name, spec in config.modes.items():
        entry: dict[str, Any] = {"ok": True, "loader": spec.loader}
        finding = found.get(name) or {"ok": False, "error": "the checker gave no answer for this mode"}
        if not finding.get("ok"):
            table = f"modes.{name}"
            error = where.error(table, "loader", str(finding.get("error")))
            entry.update(ok=False, line=where.line(table, "loader"), error=str(error))
            report["ok"] = False
        report["modes"][name] = entry
    return report


def _text(path: str | None) -> str:
    if path is None:
        return resources.files("supervisor").joinpath("default.toml").read_text(encoding="utf-8")
    return Path(path).read_text(encoding="utf-8")


class _CheckerFailed(Exception):
    """The throwaway worker gave no report: it could not start, died, or
    took longer than ``load_timeout``."""


def _import_loaders(config: Config) -> dict[str, dict[str, Any]]:
    command = [*(config.worker_command or BUILT_IN_WORKER), _FLAG]
    request = {
        "loaders": {name: spec.loader for name, spec in config.modes.items()},
        "loader_path": list(config.loader_path),
    }
    try:
        done = subprocess.run(
            command,
            input=json.dumps(request),
            capture_output=True,
            text=True,
            cwd=WORKER_CWD,
            env=worker_env({"CUDA_VISIBLE_DEVICES": ""}),
            timeout=config.load_timeout,
        )
    except subprocess.TimeoutExpired:
        raise _CheckerFailed(
            f"importing the loaders took longer than load_timeout ({config.load_timeout:g}s)"
        ) from None
    except OSError as exc:
        raise _CheckerFailed(f"cannot start the worker command {command[0]!r}: {exc}") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = None
    if done.returncode != 0 or not isinstance(report, dict):
        said = done.stderr.strip()[-_STDERR_TAIL:]
        raise _CheckerFailed(
            f"the worker command ({' '.join(command)}) could not check the loaders: it exited with code "
            f"{done.returncode}" + (f"; it said: {said}" if said else "")
        )
    return report


def run(args: argparse.Namespace) -> int:
    """The command: the report on stdout (one JSON line with ``--json``),
    the verdict's exit code (0 all ready, 6 a mistake)."""
    report = check(args.file or args.config)
    if args.json:
        print(json.dumps(report))
    else:
        if "error" in report:
            print(f"gpuvisor: bad configuration: {report['error']}", file=sys.stderr)
        for name, entry in report["modes"].items():
            print(f"{name}: ok ({entry['loader']})" if entry["ok"] else f"{name}: {entry['error']}")
        if report["ok"]:
            n = len(report["modes"])
            print(f"{report['file']}: ok, {n} mode{'s' if n != 1 else ''}")
        elif report["modes"] and "error" not in report:
            bad = sum(not entry["ok"] for entry in report["modes"].values())
            print(
                f"gpuvisor: bad configuration: {bad} of {len(report['modes'])} modes cannot be imported",
                file=sys.stderr,
            )
    return EXIT_OK if report["ok"] else EXIT_CONFIG
