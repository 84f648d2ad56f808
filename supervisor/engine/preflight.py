"""Will the worker be able to import a mode's loader? Asked before a switch
stops the worker that serves, so a typo in a loader's module never costs
the mode that was loaded.

The supervisor must not import a loader (that could pull torch, or touch a
GPU), so nothing here executes the module or its packages: the module is
looked up the way the import system would find it (``loader_path``, then
this interpreter's path and installed finders, which a worker started from
this interpreter shares), its source is compiled, and each import at its
top level that runs unconditionally is looked up the same way. What this
finds would certainly fail the load; what it does not (a module that
raises when run, a missing function) is still the load's to report. It
only refuses what it is sure of: a module found nowhere, a syntax error, a
top-level import of a package that is not installed.

A switch for a ``worker_command`` is not checked: that worker runs in
another environment, whose path this interpreter does not know.
"""

from __future__ import annotations

import ast
import importlib.machinery
import os
import sys
from collections.abc import Sequence

_STANDARD_FINDERS = (
    importlib.machinery.BuiltinImporter,
    importlib.machinery.FrozenImporter,
    importlib.machinery.PathFinder,
)
_cache: dict[tuple[str, int, int], str | None] = {}  # (source file, mtime, size) -> its problem


def _find(name: str, folders: Sequence[str]) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``name`` without running any package's ``__init__``:
    the first part from ``folders``, the path and the other finders; each
    next part from the package's own folders."""
    parts = name.split(".")
    top = parts[0]
    if top in sys.builtin_module_names:
        return importlib.machinery.ModuleSpec(top, None)
    # The worker's path: this interpreter's, and PYTHONPATH as it is now (a
    # worker inherits the environment, which may have changed since we started).
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths = [*folders, *pythonpath, *(p if p else os.getcwd() for p in sys.path)]
    spec = importlib.machinery.PathFinder.find_spec(top, paths)
    if spec is None:
        for finder in sys.meta_path:  # an editable install's finder, say
            if finder in _STANDARD_FINDERS or isinstance(finder, _STANDARD_FINDERS) or not hasattr(finder, "find_spec"):
                continue
            try:
                spec = finder.find_spec(top, None)
            except Exception:  # noqa: BLE001 - a third-party finder's trouble is not a missing module
                return importlib.machinery.ModuleSpec(top, None)  # unknown: assume it is there
            if spec is not None:
                break
    for i in range(1, len(parts)):
        if spec is None:
            return None
        locations = spec.submodule_search_locations
        if locations is None:
            return None  # not a package: it has no submodules
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(locations))
    return spec


def loader_problem(loader: str, folders: Sequence[str]) -> str | None:
    """Why a worker could not import ``loader``'s module, or None if
    nothing says it cannot. ``folders``: ``[supervisor] loader_path``."""
    module = loader.partition(":")[0]
    spec = _find(module, folders)
    if spec is None:
        where = f"[supervisor] loader_path ({', '.join(folders)}) or " if folders else ""
        return (
            f"cannot import {module!r}: no such module in {where}the installed packages or PYTHONPATH (never the "
            "working directory); name the folder that holds it in [supervisor] loader_path"
        )
    origin = spec.origin
    if not isinstance(origin, str) or not origin.endswith(".py") or not os.path.isfile(origin):
        return None  # an extension, a namespace package, a zip: nothing more to read without running it
    st = os.stat(origin)
    key = (origin, st.st_mtime_ns, st.st_size)
    if key not in _cache:
        _cache[key] = _source_problem(module, origin, folders)
    return _cache[key]


def _source_problem(module: str, origin: str, folders: Sequence[str]) -> str | None:
    try:
        with open(origin, "rb") as f:
            source = f.read()
        tree = ast.parse(source, origin)
    except SyntaxError as exc:
        return f"cannot import {module!r}: {origin}:{exc.lineno}: {exc.msg}"
    except (OSError, ValueError) as exc:
        return f"cannot import {module!r}: cannot read {origin}: {exc}"
    for node in tree.body:  # only what runs unconditionally: not inside try, if or a function
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name == "__future__":
                continue
            if _find(name.split(".")[0], folders) is None:
                return (
                    f"cannot import {module!r}: {origin}:{node.lineno} imports {name!r}, which is not installed "
                    "where the worker runs"
                )
    return None
