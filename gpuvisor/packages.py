"""Whether the packages gpuvisor imports are gpuvisor's own.

``supervisor``, ``worker`` and ``protocol`` are common names. supervisord's
PyPI distribution is called ``supervisor`` and installs a package of that
name: pip writes its files over ours (our ``__init__.py`` replaced) or, with
gpuvisor installed editable, Python finds it first. Either way the first
sign would be a bare ``ImportError`` far from the cause. So the console
script and the worker check before they import anything of them: the
package Python finds must hold a module only ours has, and its
``__init__.py`` must be the one gpuvisor installed (its hash in our
``RECORD``, where pip wrote one). On a sound install that costs a few
``stat`` calls, a folder listing and one small file read; naming the other
distribution reads every distribution's metadata, and happens only when
something is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
from collections.abc import Iterable

DISTRIBUTION = "gpuvisor"
PACKAGES = ("supervisor", "worker", "protocol")

# A module each of our packages has and a namesake of another distribution is unlikely to.
_OURS_ALONE = {"supervisor": "service/cli.py", "worker": "runtime.py", "protocol": "messages.py"}

FIX = (
    "A Python environment holds one package of each name: install gpuvisor in a virtual environment of its own "
    "(python -m venv DIR && DIR/bin/pip install gpuvisor)"
)


def foreign_package(names: Iterable[str] = PACKAGES) -> str | None:
    """What is wrong, and the fix, when one of ``names`` is not gpuvisor's
    package; None when all of them are."""
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.submodule_search_locations:
            where = "" if spec is None else f" ({spec.origin or ', '.join(spec.submodule_search_locations or [])})"
            return (
                f"gpuvisor's package {name!r} is missing{where}. Reinstall gpuvisor: "
                "pip install --force-reinstall gpuvisor"
            )
        folder = os.path.dirname(spec.origin)
        if not os.path.isfile(os.path.join(folder, *_OURS_ALONE[name].split("/"))):
            return f"the package {name!r} that Python imports, {folder}, is not gpuvisor's: {_whose(name)}. {FIX}"
        if _overwritten(name, spec.origin):
            return (
                f"gpuvisor's package {name!r} in {folder} had its __init__.py written over by another "
                f"distribution's: {_whose(name)}. {FIX}, or uninstall that distribution and then reinstall "
                "gpuvisor (pip install --force-reinstall gpuvisor)"
            )
    return None


def _overwritten(name: str, init: str) -> bool:
    """Whether ``init`` is the ``__init__.py`` that pip recorded installing
    for gpuvisor in that same folder of packages, but with other bytes. An
    editable install or a source tree has no such record: there, only
    another folder found first can be wrong. (The record is read by hand:
    ``importlib.metadata`` would cost a worker more than everything else
    this check does.)"""
    site = os.path.dirname(os.path.dirname(init))
    try:
        records = [
            entry for entry in os.listdir(site) if entry.startswith(f"{DISTRIBUTION}-") and entry.endswith(".dist-info")
        ]
    except OSError:
        return False
    wanted = f"{name}/__init__.py"
    for record in records:
        try:
            with open(os.path.join(site, record, "RECORD"), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            path, _, rest = line.partition(",")
            mode, _, value = rest.partition(",")[0].partition("=")
            if path == wanted and mode == "sha256":
                with open(init, "rb") as code:
                    digest = base64.urlsafe_b64encode(hashlib.sha256(code.read()).digest()).rstrip(b"=").decode()
                return digest != value
    return False


def _whose(name: str) -> str:
    import importlib.metadata

    others = [d for d in importlib.metadata.packages_distributions().get(name, []) if d.lower() != DISTRIBUTION]
    if not others:
        return f"it belongs to no installed distribution (a folder named {name!r} on sys.path?)"
    named = ", ".join(f"{d!r} {_version(d)}".rstrip() for d in dict.fromkeys(others))
    return f"the distribution {named} installs a package named {name!r} too"


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""
