"""The mode table and the supervisor's settings, read from TOML.

The supervisor only needs mode names and the loader strings it forwards; it
never imports a loader (that would pull torch into the supervisor). So a
loader is checked for shape here and for existence in the worker, where a
mistake becomes a ``ModeLoadError`` with the worker's traceback.

Every mistake names the file, the line and the key, because a config error
found at 3 a.m. in a systemd journal has to be fixable from the message alone.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from protocol import GpuvisorError, pack

_LOADER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_MODE_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")
_HEADER_RE = re.compile(r"^\[\s*([^\[\]]+?)\s*\]")
_KEY_RE = re.compile(r"^[\w\"'.-]+\s*=")
_STRING_RE = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _open_brackets(text: str) -> int:
    """Net ``[`` minus ``]`` outside strings and comments."""
    bare = _STRING_RE.sub("", text).split("#", 1)[0]
    return bare.count("[") - bare.count("]")


class ConfigError(GpuvisorError, ValueError):
    """The configuration file is unreadable or has a mistake. The message
    names the file, line and key; fix the file, nothing else helps."""

    code = "config_error"


@dataclass(frozen=True)
class ModeSpec:
    name: str
    loader: str
    args: dict[str, Any] = field(default_factory=dict)
    warmup: dict[str, Any] | None = None  # {"task": str, "payload": any}: run after load, before READY
    idle_unload_s: float | None = None  # None: the [supervisor] setting applies
    max_wait_s: float | None = None  # the starvation bound of this mode's jobs; None: [supervisor] max_wait_s
    batch: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {max_batch, max_delay_ms}
    preload: tuple[str, ...] = ()  # libraries its worker imports: a warm standby imports them from the start


_DEVICE_RE = re.compile(r"cuda:(0|[1-9][0-9]*)")
BAD_DEVICE_SETTING = "device must be 'auto', 'cpu' or 'cuda:N' (N = the GPU's NVML index: 0, 1, ...), got {!r}"


def valid_device_setting(value: Any) -> bool:
    """Syntax only, no NVML: ``"auto"``, ``"cpu"`` or ``"cuda:N"``."""
    return isinstance(value, str) and (value in ("auto", "cpu") or _DEVICE_RE.fullmatch(value) is not None)


# name -> (check, what is expected); the defaults live in Config alone.
_SETTINGS: dict[str, tuple[Any, str]] = {
    "heartbeat_interval": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "heartbeat_timeout": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "load_timeout": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "stop_timeout": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "job_timeout": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0 (0: none)"),
    "max_restarts": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "restart_window": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "restart_backoff": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0"),
    "restart_backoff_max": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0"),
    "max_queue": (lambda v: _whole(v) and v > 0, "a whole number > 0"),
    "window": (lambda v: _whole(v) and 1 <= v <= 1024, "a whole number from 1 to 1024"),
    "default_mode": (lambda v: isinstance(v, str), "a mode name"),
    "device": (valid_device_setting, "'auto', 'cpu' or 'cuda:N'"),
    "recycle_on_oom": (lambda v: isinstance(v, bool), "true or false"),
    "idle_unload_s": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0 (0: never)"),
    "max_wait_s": (lambda v: _number(v) and v >= 0, "a number of seconds >= 0 (0: first come, first served)"),
    "state_dir": (lambda v: isinstance(v, str), "a folder where the supervisor remembers what modes import ('': none)"),
    "reclaim_timeout": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "warm_standby": (lambda v: isinstance(v, bool), "true or false"),
    "reclaim_tolerance_mib": (lambda v: _number(v) and v >= 0, "a number of MiB >= 0"),
    "loader_path": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
        'a list of folders where loader modules live, e.g. ["modes"] (relative to this file\'s folder)',
    ),
    "worker_command": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v),
        'a non-empty list of strings, e.g. ["/opt/gpu-venv/bin/python", "-m", "worker"]',
    ),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# [daemon] keys: name -> (check, what is expected). The strings' "" is unset.
_DAEMON: dict[str, tuple[Any, str]] = {
    "endpoint": (
        lambda v: isinstance(v, str) and ("://" in v or v == ""),
        "a ZeroMQ endpoint, e.g. 'ipc:///run/gpuvisor/gpuvisor.sock'",
    ),
    "socket_group": (lambda v: isinstance(v, str), "a group name: its members may connect (socket 0660)"),
    "curve_secret_key": (lambda v: isinstance(v, str), "the path of the daemon's zmq.auth secret certificate"),
    "curve_clients_dir": (
        lambda v: isinstance(v, str),
        "a directory of the allowed clients' zmq.auth public certificates",
    ),
    "allow_unauthenticated_tcp": (lambda v: isinstance(v, bool), "true or false"),
    "drain_timeout": (
        lambda v: _number(v) and v > 0,
        "a number of seconds > 0: how long a stop may drain (keep it inside the unit's TimeoutStopSec)",
    ),
}


@dataclass(frozen=True)
class DaemonSettings:
    endpoint: str = ""  # empty: ipc:// in the runtime directory (see supervisor/client/endpoint.py)
    socket_group: str = ""
    curve_secret_key: str = ""
    curve_clients_dir: str = ""
    # Plain TCP (loopback, no CURVE) lets every local user run jobs: only when the file says so.
    allow_unauthenticated_tcp: bool = False
    # On SIGTERM (or `gpuvisor stop`), queued work runs for at most this long;
    # what is left is cancelled and the worker stopped. Well inside the shipped
    # unit's TimeoutStopSec=120, with room for the worker's stop_timeout.
    drain_timeout: float = 90.0


@dataclass(frozen=True)
class HttpModel:
    """An OpenAI ``model`` name served over HTTP: the mode it runs in, and
    the task each endpoint submits (None: the endpoint does not serve it)."""

    name: str
    mode: str
    embeddings: str | None = None
    chat: str | None = None
    completions: str | None = None
    timeout: float | None = None  # a job's timeout; None: [supervisor] job_timeout


HTTP_UNIX_DEFAULT = "unix:http.sock"
_MAX_BODY_CEILING = 64 * 1024 * 1024  # a job bigger than this could not travel to the worker anyway


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: present means served; ``listen = []`` turns it off."""

    listen: tuple[str, ...] = (HTTP_UNIX_DEFAULT,)  # "unix:PATH" (relative: the runtime directory) or "HOST:PORT"
    token_file: str = ""  # bearer tokens, one a line; absolute once parsed; "" none
    max_body_bytes: int = 16 * 1024 * 1024
    models: dict[str, HttpModel] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    modes: dict[str, ModeSpec]
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    load_timeout: float = 300.0
    stop_timeout: float = 5.0
    job_timeout: float = 0.0
    max_restarts: int = 5
    restart_window: float = 60.0
    restart_backoff: float = 0.5
    restart_backoff_max: float = 10.0
    max_queue: int = 10_000
    window: int = 1  # jobs handed to the worker at once; >1 trades exactness for throughput (docs/configuration.md)
    default_mode: str = ""
    device: str = "auto"  # "auto": the first GPU NVML sees, else the CPU
    recycle_on_oom: bool = True
    idle_unload_s: float = 0.0  # 0: keep the worker loaded while idle
    max_wait_s: float = 2.0  # the starvation bound: another mode's oldest job waits at most this long
    state_dir: str = ""  # "" : $STATE_DIRECTORY under systemd, else nowhere
    reclaim_timeout: float = 10.0
    reclaim_tolerance_mib: float = 64.0
    warm_standby: bool = True  # keep a spare worker with torch & co. imported (host RAM, no VRAM)
    worker_command: tuple[str, ...] = ()  # empty: this interpreter, ``-m worker``
    loader_path: tuple[str, ...] = ()  # absolute folders the worker imports loaders from, before its sys.path
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    http: HttpSettings | None = None  # None: no [http] table, no HTTP listener
    source: str = "<built-in>"

    def mode(self, name: str) -> ModeSpec | None:
        return self.modes.get(name)

    def idle_unload_for(self, spec: ModeSpec) -> float:
        return self.idle_unload_s if spec.idle_unload_s is None else spec.idle_unload_s

    def max_wait_for(self, mode: str) -> float:
        spec = self.modes.get(mode)
        return self.max_wait_s if spec is None or spec.max_wait_s is None else spec.max_wait_s


class _Locator:
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


_MODE_KEYS = ("loader", "args", "warmup", "idle_unload_s", "max_wait_s", "batch", "preload")


def _check_sendable(where: _Locator, table: str, key: str, value: Any) -> None:
    try:
        pack(value)  # it travels to the worker as msgpack
    except TypeError as exc:
        raise where.error(
            table, key, f"cannot be sent to a worker ({exc}); use strings, numbers, booleans, arrays and tables"
        ) from None


def _default(key: str) -> Any:
    return Config.__dataclass_fields__[key].default


def _folders(where: _Locator, entries: tuple[str, ...], base: Path) -> tuple[str, ...]:
    """``loader_path`` as absolute folders: a relative entry starts from the
    config file's folder (under systemd the working directory is /)."""
    out = []
    for entry in entries:
        folder = (base / entry).resolve()
        if not folder.is_dir():
            raise where.error("supervisor", "loader_path", f"{entry!r} is {folder}, which is not a folder")
        out.append(str(folder))
    return tuple(out)


def _seconds(where: _Locator, table: str, entry: dict, key: str, what: str) -> float | None:
    value = entry.get(key)
    if value is not None and not (_number(value) and value >= 0):
        raise where.error(table, key, f"expected a number of seconds >= 0 ({what}), got {value!r}")
    return None if value is None else float(value)


def _batch(where: _Locator, table: str, batch: Any) -> dict[str, dict[str, float]]:
    """``{ TASK = { max_batch = N, max_delay_ms = MS } }``: limits for tasks
    whose handler takes a batch (``max_batch = 1`` turns batching off)."""
    shape = "expected { TASK = { max_batch = N, max_delay_ms = MS } }"
    if not isinstance(batch, dict):
        raise where.error(table, "batch", f"{shape}, got {batch!r}")
    out = {}
    for task, limits in batch.items():
        if not isinstance(limits, dict) or set(limits) - {"max_batch", "max_delay_ms"}:
            raise where.error(table, "batch", f"{shape}; task {task!r} has {limits!r}")
        size, delay = limits.get("max_batch", 64), limits.get("max_delay_ms", 2.0)
        if not _whole(size) or not 1 <= size <= 4096:
            raise where.error(table, "batch", f"task {task!r}: max_batch must be a whole number from 1 to 4096")
        if not _number(delay) or delay < 0:
            raise where.error(table, "batch", f"task {task!r}: max_delay_ms must be a number >= 0")
        out[task] = {"max_batch": size, "max_delay_ms": float(delay)}
    return out


def _mode(where: _Locator, table: str, name: str, entry: dict) -> ModeSpec:
    loader = entry.get("loader")
    if not isinstance(loader, str) or not _LOADER_RE.match(loader):
        raise where.error(table, "loader", f"expected 'package.module:function', got {loader!r}")
    args = entry.get("args", {})
    if not isinstance(args, dict):
        raise where.error(table, "args", f"expected a table of keyword arguments, got {args!r}")
    _check_sendable(where, table, "args", args)
    warmup = entry.get("warmup")
    if warmup is not None:
        if not isinstance(warmup, dict) or not isinstance(warmup.get("task"), str) or set(warmup) - {"task", "payload"}:
            raise where.error(
                table, "warmup", f'expected {{ task = "TASK", payload = ... }} (payload optional), got {warmup!r}'
            )
        _check_sendable(where, table, "warmup", warmup)
    preload = entry.get("preload", [])
    if not isinstance(preload, list) or not all(isinstance(m, str) and _MODULE_RE.match(m) for m in preload):
        raise where.error(
            table, "preload", f'expected a list of module names, e.g. ["torch", "transformers"], got {preload!r}'
        )
    return ModeSpec(
        name,
        loader,
        args,
        warmup,
        _seconds(where, table, entry, "idle_unload_s", "0: never"),
        _seconds(where, table, entry, "max_wait_s", "0: first come, first served"),
        _batch(where, table, entry.get("batch", {})),
        tuple(preload),
    )


def loopback_host(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) is reachable from this machine alone."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_listen(entry: str) -> tuple[str, int] | str:
    """``unix:PATH`` -> PATH; ``HOST:PORT`` / ``[V6]:PORT`` -> (host, port).
    ValueError says what is wrong."""
    if entry.startswith("unix:"):
        path = entry[len("unix:") :]
        if not path or path.startswith("@"):
            raise ValueError("a unix socket needs a file path (unix:/run/gpuvisor/http.sock, or unix:NAME)")
        return path
    host, colon, port = entry.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected 'unix:PATH' or 'HOST:PORT' with a port from 1 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"HOST must be an IP address or localhost, got {host!r}") from None
    return host, int(port)


_HTTP_KEYS = ("listen", "token_file", "max_body_bytes", "models")
_HTTP_MODEL_KEYS = ("mode", "embeddings", "chat", "completions", "timeout")
_MODEL_NAME_RE = re.compile(r"^[^\s\x00-\x1f]{1,128}$")


def _http(where: _Locator, table: Any, modes: dict[str, ModeSpec], base: Path) -> HttpSettings:
    """``[http]`` and its ``[http.models.NAME]`` tables. A listener off
    loopback without tokens is refused here: a GPU open to the network by a
    typo must not start."""
    if not isinstance(table, dict):
        raise where.error("http", None, "must be a table")
    for key in table:
        if key not in _HTTP_KEYS:
            raise where.error("http", key, f"unknown key; known keys are {', '.join(_HTTP_KEYS)}")
    listen = table.get("listen", list(HttpSettings.listen))
    if not isinstance(listen, list) or not all(isinstance(e, str) for e in listen):
        raise where.error(
            "http", "listen", f'expected a list like ["unix:http.sock", "127.0.0.1:8080"], got {listen!r}'
        )
    token_file = table.get("token_file", "")
    if not isinstance(token_file, str):
        raise where.error("http", "token_file", f"expected the path of a file of bearer tokens, got {token_file!r}")
    for entry in listen:
        try:
            address = split_listen(entry)
        except ValueError as exc:
            raise where.error("http", "listen", f"{entry!r}: {exc}") from None
        if isinstance(address, tuple) and not loopback_host(address[0]) and not token_file:
            raise where.error(
                "http", "listen", f"{entry!r} is not a loopback address: anyone who can reach it could run jobs on "
                "this GPU. Set token_file (a file of bearer tokens, one a line), or listen on loopback or a unix socket"
            )  # fmt: skip
    size = table.get("max_body_bytes", HttpSettings.max_body_bytes)
    if not _whole(size) or not 1024 <= size <= _MAX_BODY_CEILING:
        raise where.error(
            "http", "max_body_bytes", f"expected a whole number from 1024 to {_MAX_BODY_CEILING}, got {size!r}"
        )
    models_table = table.get("models", {})
    if not isinstance(models_table, dict):
        raise where.error("http", "models", "must be a table of [http.models.NAME] tables")
    models = {name: _http_model(where, name, entry, modes) for name, entry in models_table.items()}
    if token_file:
        token_file = str((base / token_file).resolve())
    return HttpSettings(tuple(listen), token_file, size, models)


def _http_model(where: _Locator, name: str, entry: Any, modes: dict[str, ModeSpec]) -> HttpModel:
    table = f"http.models.{name}"
    if not _MODEL_NAME_RE.match(name):
        raise where.error(table, None, "a model name is 1-128 characters, no spaces or control characters")
    if not isinstance(entry, dict):
        raise where.error("http.models", name, 'must be a table: { mode = "MODE", embeddings = "TASK" ... }')
    for key in entry:
        if key not in _HTTP_MODEL_KEYS:
            raise where.error(table, key, f"unknown key; a model has 'mode' and {', '.join(_HTTP_MODEL_KEYS[1:])}")
    mode = entry.get("mode")
    if not isinstance(mode, str) or mode not in modes:
        raise where.error(table, "mode", f"expected one of the modes {sorted(modes)}, got {mode!r}")
    tasks = {key: entry.get(key) for key in ("embeddings", "chat", "completions")}
    for key, task in tasks.items():
        if task is not None and (not isinstance(task, str) or not task):
            raise where.error(table, key, f"expected the name of the task that serves /v1/{key}, got {task!r}")
    if not any(tasks.values()):
        raise where.error(table, None, "names no task: give at least one of embeddings, chat or completions")
    return HttpModel(name, mode, **tasks, timeout=_seconds(where, table, entry, "timeout", "0: none"))


def parse(text: str, source: str = "<string>", base: Path | None = None) -> Config:
    """``base``: the folder relative paths in the file start from (the
    file's own folder; the working directory for a string)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    where = _Locator(text, source)

    for key in data:
        if key not in ("supervisor", "modes", "daemon", "http"):
            raise where.error(key, None, "unknown table; expected [supervisor], [daemon], [http] or [modes.NAME]")

    daemon_table = data.get("daemon", {})
    if not isinstance(daemon_table, dict):
        raise where.error("daemon", None, "must be a table")
    for key, value in daemon_table.items():
        if key not in _DAEMON:
            raise where.error("daemon", key, f"unknown key; known keys are {', '.join(sorted(_DAEMON))}")
        check, expected = _DAEMON[key]
        if not check(value):
            raise where.error("daemon", key, f"expected {expected}, got {value!r}")
    if bool(daemon_table.get("curve_secret_key")) != bool(daemon_table.get("curve_clients_dir")):
        key = "curve_clients_dir" if daemon_table.get("curve_secret_key") else "curve_secret_key"
        raise where.error("daemon", key, "CURVE needs both curve_secret_key and curve_clients_dir")

    settings: dict[str, Any] = {}
    section = data.get("supervisor", {})
    if not isinstance(section, dict):
        raise where.error("supervisor", None, "must be a table")
    for key, value in section.items():
        if key not in _SETTINGS:
            raise where.error("supervisor", key, f"unknown key; known keys are {', '.join(sorted(_SETTINGS))}")
        check, expected = _SETTINGS[key]
        if not check(value):
            raise where.error("supervisor", key, f"expected {expected}, got {value!r}")
        if isinstance(value, list):
            value = tuple(value)
        if key == "loader_path":
            value = _folders(where, value, base or Path.cwd())
        elif _number(value) and isinstance(_default(key), float):
            value = float(value)
        settings[key] = value

    modes_table = data.get("modes")
    if not isinstance(modes_table, dict) or not modes_table:
        raise ConfigError(f"{source}: no modes: add at least one [modes.NAME] table with a 'loader'")
    modes: dict[str, ModeSpec] = {}
    for name, entry in modes_table.items():
        table = f"modes.{name}"
        if not _MODE_NAME_RE.match(name):
            raise where.error(table, None, "a mode name is 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(entry, dict):
            raise where.error("modes", name, "must be a table with a 'loader'")
        for key in entry:
            if key not in _MODE_KEYS:
                raise where.error(
                    table, key, f"unknown key; a mode has 'loader' and optional {', '.join(_MODE_KEYS[1:])}"
                )
        modes[name] = _mode(where, table, name, entry)

    default_mode = settings.get("default_mode", "")
    if default_mode and default_mode not in modes:
        raise where.error("supervisor", "default_mode", f"{default_mode!r} is not a mode; modes are {sorted(modes)}")
    if settings.get("heartbeat_timeout", _default("heartbeat_timeout")) <= settings.get(
        "heartbeat_interval", _default("heartbeat_interval")
    ):
        key = "heartbeat_timeout" if "heartbeat_timeout" in settings else "heartbeat_interval"
        raise where.error(
            "supervisor", key, "heartbeat_timeout must be longer than heartbeat_interval (default 10 and 1)"
        )
    if "drain_timeout" in daemon_table:
        daemon_table = {**daemon_table, "drain_timeout": float(daemon_table["drain_timeout"])}
    http = _http(where, data["http"], modes, base or Path.cwd()) if "http" in data else None
    return Config(modes=modes, source=source, daemon=DaemonSettings(**daemon_table), http=http, **settings)


def load(path: str | Path | None = None) -> Config:
    """The file at ``path``, or the built-in default when it is None."""
    if path is None:
        text = resources.files("supervisor").joinpath("default.toml").read_text(encoding="utf-8")
        return parse(text, "<built-in default.toml>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, str(path), path.resolve().parent)
