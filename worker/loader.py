"""Resolve a mode's loader and check what it returns.

A loader is named ``package.module:function`` in the configuration; it is
called with the mode's ``args`` as keyword arguments and returns a mapping of
task name to handler. Handlers take the job's payload and return a
msgpack-encodable result. Only the worker calls this: the supervisor never
imports a loader, so it never pulls torch in by accident.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Handler = Callable[[Any], Any]


def resolve(path: str, folders: Sequence[str] = ()) -> Callable[..., Any]:
    """``folders`` (the config's ``loader_path``) go ahead of ``sys.path``,
    so a loader module beside the config file is found: the worker never
    looks in a working directory (it runs in /, with ``-P``)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"loader {path!r} is not of the form 'package.module:function'")
    sys.path[:0] = [folder for folder in folders if folder not in sys.path]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        where = f"the loader_path folders {', '.join(folders)} and " if folders else ""
        raise ImportError(
            f"loader {path!r}: cannot import {module_name!r}: {exc}. The worker looked in {where}its sys.path "
            "(the installed packages and PYTHONPATH; never the working directory); name the folder that holds it "
            "in [supervisor] loader_path, relative to the config file's folder"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AttributeError(f"loader {path!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(target):
        raise TypeError(f"loader {path!r} is a {type(target).__name__}, not a callable")
    return target


def load_mode(loader: str, args: Mapping[str, Any], folders: Sequence[str] = ()) -> dict[str, Handler]:
    handlers = resolve(loader, folders)(**dict(args))
    if not isinstance(handlers, Mapping):
        raise TypeError(
            f"loader {loader!r} returned {type(handlers).__name__}; it must return a mapping of task name to handler"
        )
    bad = [name for name, fn in handlers.items() if not isinstance(name, str) or not callable(fn)]
    if bad:
        raise TypeError(f"loader {loader!r} returned non-string task names or non-callable handlers: {bad!r}")
    return dict(handlers)
