"""``compose``: several models in one mode, from the configuration alone.

A mode is one process, so the models it holds share one CUDA context and
one allocator: an embedder and a reranker (or a generator) loaded together
cost one context, not two, and switch in and out as a unit. ``parts`` lists
the loaders to call, each with its own ``args``; their task tables are
merged, and a task name two parts both define is an error rather than a
silent override.

::

    [modes.assistant]
    loader = "worker.modes.compose:load"
    args = { parts = [
        { loader = "worker.modes.embed:load", args = { device = "auto" } },
        { loader = "worker.modes.generate:load" },
    ] }
"""

from __future__ import annotations

from typing import Any

from worker.loader import Handler, load_mode


def load(parts: list[dict[str, Any]]) -> dict[str, Handler]:
    if not isinstance(parts, list) or not parts:
        raise TypeError("compose: 'parts' must be a non-empty list of {loader = ..., args = {...}}")
    tasks: dict[str, Handler] = {}
    owner: dict[str, str] = {}
    for n, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("loader"), str) or set(part) - {"loader", "args"}:
            raise TypeError(f"compose: part {n} must be {{loader = 'package.module:function', args = {{...}}}}")
        loaded = load_mode(part["loader"], part.get("args", {}))
        for name, handler in loaded.items():
            if name in tasks:
                raise ValueError(f"compose: task {name!r} is defined by both {owner[name]!r} and {part['loader']!r}")
            tasks[name], owner[name] = handler, part["loader"]
    return tasks
