"""What a reload changed, told back to whoever asked for it.

A reload (SIGHUP, ``gpuvisor reload``, the HTTP door's admin route) swaps in
the file's configuration, or keeps the running one when the file has a
mistake. An operator who edits a file wants to know which of the edits took:
so the answer lists the modes added, removed and changed, the settings that
changed, and a note for each change that waits for something (a restart of
the daemon, or of a loaded mode's worker).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from supervisor.config import Config

# Read again when they are next used: everything else in [daemon] is bound with the socket.
_DAEMON_LIVE = frozenset({"drain_timeout"})
# The supervisor keeps these until it restarts (the queue's size, the devices it drives).
_SUPERVISOR_FIXED = frozenset({"max_queue", "device", "devices"})


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if old is None or new is None:
        return [prefix.rstrip(".")] if old is not new else []
    return [f"{prefix}{f.name}" for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]


def refused(path: str | None, error: str) -> dict[str, Any]:
    """The answer when the file could not be read: nothing changed."""
    nothing: dict[str, list] = {key: [] for key in ("added", "removed", "changed", "settings", "notes")}
    return {"reloaded": False, "file": path, "error": error, **nothing}


def compare(old: Config, new: Config, loaded: list[str]) -> dict[str, Any]:
    """The answer for a reload that took: ``loaded`` are the modes workers
    hold now (they keep the entry they were loaded with)."""
    added = sorted(set(new.modes) - set(old.modes))
    removed = sorted(set(old.modes) - set(new.modes))
    changed = sorted(m for m in set(old.modes) & set(new.modes) if old.modes[m] != new.modes[m])
    top = [f for f in _changed_fields(old, new) if f not in ("modes", "daemon", "http", "source")]
    daemon = _changed_fields(old.daemon, new.daemon, "daemon.")
    http = _changed_fields(old.http, new.http, "http.")
    notes = [f"{key} keeps its value until the daemon restarts" for key in top if key in _SUPERVISOR_FIXED]
    notes += [
        f"[daemon] {key.removeprefix('daemon.')} applies when the daemon restarts"
        for key in daemon
        if key.removeprefix("daemon.") not in _DAEMON_LIVE
    ]
    notes += [
        f"mode {m!r} is loaded with its old entry; `gpuvisor restart {m}` loads the new one"
        for m in changed
        if m in loaded
    ]
    notes += [
        f"mode {m!r} is no longer configured but still loaded; it serves until the next switch"
        for m in removed
        if m in loaded
    ]
    return {
        "reloaded": True,
        "file": new.source,
        "error": None,
        "added": added,
        "removed": removed,
        "changed": changed,
        "settings": top + daemon + http,
        "notes": notes,
    }


def describe(report: dict[str, Any]) -> str:
    """The answer in lines a person reads (``gpuvisor reload``)."""
    if not report["reloaded"]:
        return f"kept the running configuration: {report['error']}"
    parts = [f"{what} {', '.join(report[what])}" for what in ("added", "removed", "changed") if report[what]]
    if report["settings"]:
        parts.append(f"settings changed: {', '.join(report['settings'])}")
    lines = [f"reloaded {report['file']}: {'; '.join(parts) or 'nothing changed'}"]
    return "\n".join([*lines, *(f"  note: {note}" for note in report["notes"])])
