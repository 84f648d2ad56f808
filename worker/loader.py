"""Resolve a mode's loader and check what it returns.

A loader is named ``package.module:function`` in the configuration; it is
called with the mode's ``args`` as keyword arguments and returns a mapping of
task name to handler. Handlers take the job's payload and return a
msgpack-encodable result. Only the worker calls this: the supervisor never
imports a loader, so it never pulls torch in by accident.

A mode's author meets its mistakes here, so each one says where it is: a
loader module found nowhere gets the ``loader_path`` advice; a module that
is found but imports a library that is not installed names that library and
the Python that lacks it; anything else raised at import or in ``load``
carries the loader file's line it came through (``failure_text``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

Handler = Callable[[Any], Any]


class LoaderNotFound(ImportError):
    """The loader's own module (or a package above it) is found nowhere the
    worker looks: the configuration's fault (a typo, or ``loader_path``)."""


class MissingDependency(ImportError):
    """The loader's module is there, but something it imports is not
    installed in the worker's Python: installing it is the fix."""


def _module_name(path: str) -> tuple[str, str]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"loader {path!r} is not of the form 'package.module:function'")
    return module_name, attr


def resolve(path: str, folders: Sequence[str] = ()) -> Callable[..., Any]:
    """``folders`` (the config's ``loader_path``) go ahead of ``sys.path``,
    so a loader module beside the config file is found: the worker never
    looks in a working directory (it runs in /, with ``-P``)."""
    module_name, attr = _module_name(path)
    sys.path[:0] = [folder for folder in folders if folder not in sys.path]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == module_name or module_name.startswith(missing + "."):
            where = f"the loader_path folders {', '.join(folders)} and " if folders else ""
            raise LoaderNotFound(
                f"loader {path!r}: cannot import {module_name!r}: {exc}. The worker looked in {where}its sys.path "
                "(the installed packages and PYTHONPATH; never the working directory); name the folder that holds "
                "it in [supervisor] loader_path, relative to the config file's folder",
                name=missing,
            ) from exc
        at = _located(exc, module_name)
        raise MissingDependency(
            f"the loader {path!r}{f' ({at})' if at else ''} needs the module {missing!r}, which is not installed "
            f"in the worker's Python ({sys.executable}): pip install it there",
            name=missing,
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AttributeError(
                f"loader {path!r}: module {module_name!r} ({getattr(module, '__file__', None) or 'no file'}) "
                f"has no {attr!r}"
            ) from None
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


def failure_text(loader: str, exc: BaseException) -> str:
    """``exc`` as one line for the caller and the log: its type and message,
    then where in the loader's own file it came through, so that a mode's
    author sees the line to fix without asking for the traceback. A
    ``LoaderNotFound`` or ``MissingDependency`` already says where."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (LoaderNotFound, MissingDependency)):
        return text
    try:
        module_name, attr = _module_name(loader)
    except ValueError:
        return text
    at = _located(exc, module_name) or _defined_at(module_name, attr)
    return f"{text} (at {at})" if at else text


def _located(exc: BaseException, module_name: str) -> str | None:
    """``FILE line N``: the deepest frame that ran in the loader's module, in
    ``exc`` or the exceptions it was raised from (a failed warm-up wraps
    the handler's own error), the innermost first."""
    for error in reversed(list(_chain(exc))):
        found = None
        for frame, line in _frames(error.__traceback__):
            if frame.f_globals.get("__name__") == module_name:
                found = f"{frame.f_code.co_filename} line {line}"
        if found:
            return found
    return None


def _defined_at(module_name: str, attr: str) -> str | None:
    """Where the loader function is defined: for an error raised in calling it
    (arguments it does not take), before any of its lines ran."""
    target: Any = sys.modules.get(module_name)
    for part in attr.split("."):
        target = getattr(target, part, None)
    try:
        return f"{inspect.getsourcefile(target)} line {inspect.getsourcelines(target)[1]}"
    except (TypeError, OSError):
        return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _frames(tb: TracebackType | None) -> Iterator[tuple[Any, int]]:
    while tb is not None:
        yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


# Libraries slow enough to import that a warm standby should have them ready,
# with every submodule the mode pulled in (``import transformers`` alone is
# lazy: the model classes are most of the cost). Third-party only: importing
# them touches no GPU, which a loader's own module might do at import time.
PRELOADABLE = frozenset(
    {
        "torch",
        "transformers",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "sentence_transformers",
        "accelerate",
        "diffusers",
        "vllm",
        "onnxruntime",
        "scipy",
        "sklearn",
        "numpy",
    }
)


def heavy_imports() -> list[str]:
    """The heavy modules this worker imported, told in READY: in import
    order (sys.modules keeps it), so a standby can repeat it."""
    return [name for name in list(sys.modules) if name.partition(".")[0] in PRELOADABLE]
