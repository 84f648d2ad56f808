"""What earlier workers imported, remembered across restarts, so the warm
standby of a freshly started supervisor can preload it before any mode has
loaded.

One small JSON file, ``standby.json``, in the state directory: ``[supervisor]
state_dir``, else systemd's ``$STATE_DIRECTORY`` (``StateDirectory=`` in the
unit), else none and nothing is remembered. It holds the heavy modules
workers reported in READY, in import order, and which modes imported any.
It is a hint, never a source of truth: a missing file is the first start, a
file that cannot be read or parsed is logged and ignored (the next READY
writes a good one), and a name that no longer imports costs the standby one
failed import. Written whole to a temporary file and renamed over the old
one, so a crash mid-write leaves the old file or the new, never half of one;
written only when a READY taught something new (rarely: a few times after a
start), and small (tens of KB), so the loop thread writes it itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gpuvisor")

FILE_NAME = "standby.json"
VERSION = 1
MODULE_NAME = re.compile(r"[A-Za-z_][\w.]{0,200}")  # what a standby may be asked to import


@dataclass
class Learned:
    preload: tuple[str, ...] = ()  # heavy modules workers imported, in import order, no repeats
    heavy: dict[str, bool] = field(default_factory=dict)  # mode -> it imported such modules when it last loaded


def state_directory(setting: str) -> Path | None:
    """Where to remember: the setting, else the first of systemd's
    ``$STATE_DIRECTORY`` (colon-separated when the unit names several)."""
    chosen = setting or os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(chosen) if chosen else None


def read(folder: Path | None) -> Learned:
    if folder is None:
        return Learned()
    path = folder / FILE_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return Learned()
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s, what earlier workers imported: %s", path, exc)
        return Learned()
    data = data if isinstance(data, dict) else {}
    preload, heavy = data.get("preload"), data.get("heavy")
    if (
        data.get("version") != VERSION
        or not isinstance(preload, list)
        or not all(isinstance(m, str) and MODULE_NAME.fullmatch(m) for m in preload)
        or not isinstance(heavy, dict)
        or not all(isinstance(v, bool) for v in heavy.values())
    ):
        log.warning("ignoring %s, what earlier workers imported: not a version %d gpuvisor standby file", path, VERSION)
        return Learned()
    return Learned(tuple(dict.fromkeys(preload)), dict(heavy))


def write(folder: Path | None, learned: Learned) -> None:
    """Replace the file (made with the folder if need be); a failure is
    logged and costs only the next start's head start."""
    if folder is None:
        return
    data = json.dumps({"version": VERSION, "preload": list(learned.preload), "heavy": learned.heavy}).encode()
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=folder)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / FILE_NAME)
        tmp = None
    except OSError as exc:
        log.warning("could not remember what workers import in %s: %s", folder / FILE_NAME, exc)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
