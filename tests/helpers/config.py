"""Config text for the tests, built from Python values, so that a test's
config reads as what it sets: ``config_text(supervisor={"window": 4})``.

Tests of the config file itself (a line number in an error, a typo, a broken
file) write their TOML by hand: there the text is what is under test."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DIAG = "worker.modes.diag:load"
"""The loader of the built-in diagnostic mode, which most tests serve."""

DIAG_HOOKS = {"loader": DIAG, "args": {"test_hooks": True}}
"""The diagnostic mode with its test hooks on (``count``'s ``record``,
``crash``'s ``once_file`` and ``say``, ``chatter``), for the tests that use
them: off in ``DIAG``, as in the built-in config."""

Mode = str | Mapping[str, Any]
"""A mode: its loader, or its whole table (``loader``, ``args``, ``warmup``...)."""


def secret_file(path: Path, *lines: str) -> str:
    """A token file as the daemon accepts one: the lines, readable by its owner alone. Returns its path."""
    path.write_text("".join(f"{line}\n" for line in lines))
    path.chmod(0o600)
    return str(path)


def config_text(modes: Mapping[str, Mode] | None = None, *, supervisor: Mapping[str, Any] | None = None,
                daemon: Mapping[str, Any] | None = None) -> str:  # fmt: skip
    """TOML text with ``[supervisor]`` and ``[daemon]`` when given, then a
    ``[modes.NAME]`` table per mode: the diag mode alone unless ``modes``
    says otherwise."""
    if modes is None:
        modes = {"diag": DIAG}
    tables: dict[str, Any] = {}
    if supervisor:
        tables["supervisor"] = dict(supervisor)
    if daemon:
        tables["daemon"] = dict(daemon)
    tables["modes"] = {name: {"loader": mode} if isinstance(mode, str) else dict(mode) for name, mode in modes.items()}
    text = ""
    for name, table in tables.items():
        if name == "modes":
            text += "".join(_table(f"modes.{_key(mode)}", settings) for mode, settings in table.items())
        else:
            text += _table(name, table)
    # A value this small writer got wrong would be a silent change of the
    # test's config: read the text back and compare.
    assert tomllib.loads(text) == tables, (text, tables)
    return text


def _table(header: str, table: Mapping[str, Any]) -> str:
    return f"[{header}]\n" + "".join(f"{_key(key)} = {_value(value)}\n" for key, value in table.items())


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")
