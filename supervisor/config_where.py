"""Where a mistake is in a configuration file, and the checks every
section shares.

tomllib keeps no positions, and a message without a line is half a
message: the ``Locator`` finds the line of a table or key in the text, so
every mistake names file, line and key."""

from __future__ import annotations

import re
from typing import Any

from protocol import GpuvisorError

_HEADER_RE = re.compile(r"^\[\s*([^\[\]]+?)\s*\]")
_KEY_RE = re.compile(r"^[\w\"'.-]+\s*=")
_STRING_RE = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


class ConfigError(GpuvisorError, ValueError):
    """The configuration file is unreadable or has a mistake. The message
    names the file, line and key; fix the file, nothing else helps."""

    code = "config_error"


def _open_brackets(text: str) -> int:
    """Net ``[`` minus ``]`` outside strings and comments."""
    bare = _STRING_RE.sub("", text).split("#", 1)[0]
    return bare.count("[") - bare.count("]")


class Locator:
    """Finds the line of a table or key in the TOML text. tomllib keeps no
    positions, and a message without a line is half a message."""

    def __init__(self, text: str, source: str):
        # split("\n"), not splitlines(): TOML allows U+2028 and friends inside
        # strings and comments, and they do not start a line.
        self.lines = self._structural(text.split("\n"))
        self.source = source

    @staticmethod
    def _structural(lines: list[str]) -> list[str]:
        """Blank out lines inside multi-line strings and arrays, so a line
        there that looks like ``[table]`` or ``key =`` is not taken for one."""
        out: list[str] = []
        quote: str | None = None  # delimiter of the open multi-line string
        depth = 0  # brackets still open in a multi-line array
        for raw in lines:
            if quote is not None:
                if raw.count(quote) % 2 == 1:
                    quote = None
                out.append("")
                continue
            if depth > 0:
                depth = max(0, depth + _open_brackets(raw))
                out.append("")
                continue
            out.append(raw)
            text = raw.strip()
            for delim in ('"""', "'''"):
                if text.count(delim) % 2 == 1:
                    quote = delim
            if quote is None and _KEY_RE.match(text):
                depth = max(0, _open_brackets(text.split("=", 1)[1]))
        return out

    @staticmethod
    def _norm(dotted: str) -> str:
        return ".".join(part.strip().strip("\"'") for part in dotted.split("."))

    def line(self, table: str, key: str | None = None) -> int | None:
        current = ""
        for number, raw in enumerate(self.lines, 1):
            text = raw.strip()
            header = _HEADER_RE.match(text)
            if header:
                current = self._norm(header.group(1))
                if key is None and current == table:
                    return number
                continue
            if key is not None and current == table and re.match(rf"^[\"']?{re.escape(key)}[\"']?\s*=", text):
                return number
        return None if key is None else self.line(table)

    def error(self, table: str, key: str | None, problem: str) -> ConfigError:
        number = self.line(table, key)
        where = f"{self.source}:{number}" if number else self.source
        what = f"[{table}]" + (f" key {key!r}" if key else "")
        return ConfigError(f"{where}: {what}: {problem}")


def number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def seconds(where: Locator, table: str, entry: dict, key: str, what: str) -> float | None:
    value = entry.get(key)
    if value is not None and not (number(value) and value >= 0):
        raise where.error(table, key, f"expected a number of seconds >= 0 ({what}), got {value!r}")
    return None if value is None else float(value)
