"""The mode table and the supervisor's settings, read from TOML.

The supervisor only needs mode names and the loader strings it forwards; it
never imports a loader (that would pull torch into the supervisor). So a
loader is checked for shape here and for existence in the worker, where a
mistake becomes a ``ModeLoadError`` with the worker's traceback.

Every mistake names the file, the line and the key, because a config error
found at 3 a.m. in a systemd journal has to be fixable from the message alone.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from protocol import pack
from supervisor.config_http import HttpSettings, parse_http
from supervisor.config_where import ConfigError, Locator, number, seconds, whole

__all__ = ["Config", "ConfigError", "DaemonSettings", "ModeSpec", "load", "parse"]

_LOADER_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_MODE_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")


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
    devices: tuple[str, ...] = ()  # the devices (by name) its workers may run on; empty: any
    replicas: int = 1  # how many devices may hold it loaded at once

    def allows(self, device: str) -> bool:
        """Its workers may run on ``device`` (by name)."""
        return not self.devices or device in self.devices


_DEVICE_RE = re.compile(r"cuda:(0|[1-9][0-9]*)")
BAD_DEVICE_SETTING = "device must be 'auto', 'cpu' or 'cuda:N' (N = the GPU's NVML index: 0, 1, ...), got {!r}"


def valid_device_setting(value: Any) -> bool:
    """Syntax only, no NVML: ``"auto"``, ``"cpu"`` or ``"cuda:N"``."""
    return isinstance(value, str) and (value in ("auto", "cpu") or _DEVICE_RE.fullmatch(value) is not None)


def _valid_devices(value: Any) -> bool:
    """``"auto"``, or a list of ``"cpu"`` and ``"cuda:N"``: each GPU once, the
    CPU as often as wanted (each is a worker of its own)."""
    if value == "auto":
        return True
    if not isinstance(value, list) or not value or len(value) > 64:
        return False
    gpus = [v for v in value if v != "cpu"]
    return all(v == "cpu" or (isinstance(v, str) and _DEVICE_RE.fullmatch(v)) for v in value) and len(set(gpus)) == len(
        gpus
    )


def device_names(settings: list[str] | tuple[str, ...]) -> list[str]:
    """What each device of a ``devices`` list is called (in status, metrics,
    a mode's ``devices`` and ``switch_mode(device=...)``): ``cuda:N`` as
    it is, ``cpu`` alone as ``cpu``, and several ``cpu`` as ``cpu:0``,
    ``cpu:1`` ... in their order."""
    cpus = sum(1 for s in settings if s == "cpu")
    names, k = [], 0
    for s in settings:
        if s == "cpu" and cpus > 1:
            s, k = f"cpu:{k}", k + 1
        names.append(s)
    return names


# name -> (check, what is expected); the defaults live in Config alone.
_SETTINGS: dict[str, tuple[Any, str]] = {
    "heartbeat_interval": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "heartbeat_timeout": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "load_timeout": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "stop_timeout": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "job_timeout": (lambda v: number(v) and v >= 0, "a number of seconds >= 0 (0: none)"),
    "max_restarts": (lambda v: whole(v) and v >= 0, "a whole number >= 0"),
    "restart_window": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "restart_backoff": (lambda v: number(v) and v >= 0, "a number of seconds >= 0"),
    "restart_backoff_max": (lambda v: number(v) and v >= 0, "a number of seconds >= 0"),
    "broken_retry_s": (lambda v: number(v) and v >= 0, "a number of seconds >= 0 (0: only an operator's word)"),
    "broken_retry_max_s": (lambda v: number(v) and v >= 0, "a number of seconds >= 0"),
    "max_queue": (lambda v: whole(v) and v > 0, "a whole number > 0"),
    "max_queue_bytes": (lambda v: whole(v) and v >= 1024, "a whole number of bytes >= 1024"),
    "max_queue_per_client": (lambda v: whole(v) and v > 0, "a whole number > 0"),
    "max_queue_bytes_per_client": (lambda v: whole(v) and v >= 1024, "a whole number of bytes >= 1024"),
    "window": (lambda v: whole(v) and 1 <= v <= 1024, "a whole number from 1 to 1024"),
    "default_mode": (lambda v: isinstance(v, str), "a mode name"),
    "device": (valid_device_setting, "'auto', 'cpu' or 'cuda:N'"),
    "devices": (
        _valid_devices,
        '\'auto\' (every GPU NVML sees) or a list of devices, e.g. ["cuda:0", "cuda:1"] or ["cpu", "cpu"] '
        "(each GPU at most once)",
    ),
    "recycle_on_oom": (lambda v: isinstance(v, bool), "true or false"),
    "idle_unload_s": (lambda v: number(v) and v >= 0, "a number of seconds >= 0 (0: never)"),
    "max_wait_s": (lambda v: number(v) and v >= 0, "a number of seconds >= 0 (0: first come, first served)"),
    "state_dir": (lambda v: isinstance(v, str), "a folder where the supervisor remembers what modes import ('': none)"),
    "reclaim_timeout": (lambda v: number(v) and v > 0, "a number of seconds > 0"),
    "warm_standby": (lambda v: isinstance(v, bool), "true or false"),
    "reclaim_tolerance_mib": (lambda v: number(v) and v >= 0, "a number of MiB >= 0"),
    "loader_path": (
        lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v),
        'a list of folders where loader modules live, e.g. ["modes"] (relative to this file\'s folder)',
    ),
    "worker_command": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v),
        'a non-empty list of strings, e.g. ["/opt/gpu-venv/bin/python", "-m", "worker"]',
    ),
}


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
    "admin_group": (
        lambda v: isinstance(v, str),
        "a group name: its members may stop the daemon and switch or restart modes ('': none)",
    ),
    "curve_admins_dir": (
        lambda v: isinstance(v, str),
        "a directory of the public certificates of the CURVE clients that may stop the daemon and switch or "
        "restart modes",
    ),
    "max_connections": (lambda v: whole(v) and v >= 16, "a whole number >= 16"),
    "max_connections_per_user": (lambda v: whole(v) and v >= 1, "a whole number >= 1"),
    "drain_timeout": (
        lambda v: number(v) and v > 0,
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
    # Operators (shutdown, switch, restart) beyond the daemon's own user and root: a group's members
    # on the unix socket, CURVE keys on TCP. Other callers may only run jobs.
    admin_group: str = ""
    curve_admins_dir: str = ""
    # Connections to the ZeroMQ socket, in all and per user other than the daemon's own and root (on the
    # unix socket): libzmq has no bound of its own, and aborts the daemon when its descriptors run out.
    max_connections: int = 1024
    max_connections_per_user: int = 64
    # On SIGTERM (or `gpuvisor stop`), queued work runs for at most this long;
    # what is left is cancelled and the worker stopped. Well inside the shipped
    # unit's TimeoutStopSec=120, with room for the worker's stop_timeout.
    drain_timeout: float = 90.0


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
    broken_retry_s: float = 30.0  # a broken mode is tried again by itself this long after it broke ...
    broken_retry_max_s: float = 600.0  # ... the wait doubling each time it breaks again, up to this
    max_queue: int = 10_000  # jobs and switches waiting or running, from every client
    max_queue_bytes: int = 1024**3  # the bytes of their payloads
    # One client's share of both (a ZeroMQ connection, an HTTP token or connection; not this process's own
    # calls): None is a quarter of the whole, so one client can never fill the queue for the others.
    max_queue_per_client: int | None = None
    max_queue_bytes_per_client: int | None = None
    window: int = 1  # jobs handed to the worker at once; >1 trades exactness for throughput (docs/configuration.md)
    default_mode: str = ""
    device: str = "auto"  # "auto": the first GPU NVML sees, else the CPU
    devices: tuple[str, ...] | str = ()  # several devices, a worker each; "auto": every GPU. Empty: ``device``
    recycle_on_oom: bool = True
    idle_unload_s: float = 0.0  # 0: keep the worker loaded while idle
    max_wait_s: float = 3.0  # the starvation bound: another mode's oldest job waits at most this long
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

    def device_settings(self) -> tuple[str, ...] | str:
        """What the supervisor drives: ``devices``, or the one ``device``."""
        return self.devices or (self.device,)

    def client_share(self) -> tuple[int, int]:
        """One client's share of the queue: (jobs, bytes)."""
        jobs = self.max_queue_per_client or max(1, self.max_queue // 4)
        nbytes = self.max_queue_bytes_per_client or self.max_queue_bytes // 4
        return min(jobs, self.max_queue), min(nbytes, self.max_queue_bytes)

    def max_wait_for(self, mode: str) -> float:
        spec = self.modes.get(mode)
        return self.max_wait_s if spec is None or spec.max_wait_s is None else spec.max_wait_s


_MODE_KEYS = ("loader", "args", "warmup", "idle_unload_s", "max_wait_s", "batch", "preload", "devices", "replicas")


def _check_sendable(where: Locator, table: str, key: str, value: Any) -> None:
    try:
        pack(value)  # it travels to the worker as msgpack
    except TypeError as exc:
        raise where.error(
            table, key, f"cannot be sent to a worker ({exc}); use strings, numbers, booleans, arrays and tables"
        ) from None


def _default(key: str) -> Any:
    return Config.__dataclass_fields__[key].default


def _folders(where: Locator, entries: tuple[str, ...], base: Path) -> tuple[str, ...]:
    """``loader_path`` as absolute folders: a relative entry starts from the
    config file's folder (under systemd the working directory is /)."""
    out = []
    for entry in entries:
        folder = (base / entry).resolve()
        if not folder.is_dir():
            raise where.error("supervisor", "loader_path", f"{entry!r} is {folder}, which is not a folder")
        out.append(str(folder))
    return tuple(out)


def _batch(where: Locator, table: str, batch: Any) -> dict[str, dict[str, float]]:
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
        if not whole(size) or not 1 <= size <= 4096:
            raise where.error(table, "batch", f"task {task!r}: max_batch must be a whole number from 1 to 4096")
        if not number(delay) or delay < 0:
            raise where.error(table, "batch", f"task {task!r}: max_delay_ms must be a number >= 0")
        out[task] = {"max_batch": size, "max_delay_ms": float(delay)}
    return out


def _mode(where: Locator, table: str, name: str, entry: dict) -> ModeSpec:
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
    devices = entry.get("devices", [])
    if (
        not isinstance(devices, list)
        or not all(isinstance(d, str) and d for d in devices)
        or len(set(devices)) < len(devices)
    ):
        raise where.error(table, "devices", f'expected a list of device names, e.g. ["cuda:1"], got {devices!r}')
    replicas = entry.get("replicas", 1)
    if not whole(replicas) or replicas < 1:
        raise where.error(table, "replicas", f"expected a whole number >= 1, got {replicas!r}")
    return ModeSpec(
        name,
        loader,
        args,
        warmup,
        seconds(where, table, entry, "idle_unload_s", "0: never"),
        seconds(where, table, entry, "max_wait_s", "0: first come, first served"),
        _batch(where, table, entry.get("batch", {})),
        tuple(preload),
        tuple(devices),
        replicas,
    )


def parse(text: str, source: str = "<string>", base: Path | None = None) -> Config:
    """``base``: the folder relative paths in the file start from (the
    file's own folder; the working directory for a string)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    where = Locator(text, source)

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
    if daemon_table.get("curve_admins_dir") and not daemon_table.get("curve_secret_key"):
        raise where.error(
            "daemon", "curve_admins_dir", "admin keys need CURVE: set curve_secret_key and curve_clients_dir too"
        )
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
        if key == "devices" and "device" in section:
            raise where.error("supervisor", key, "set device (one) or devices (several), not both")
        if key == "loader_path":
            value = _folders(where, value, base or Path.cwd())
        elif key == "state_dir" and value:
            value = str((base or Path.cwd()) / value)  # like loader_path: under systemd the working directory is /
        elif number(value) and isinstance(_default(key), float):
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
    known = settings.get("devices")
    for mode in modes.values():
        if isinstance(known, tuple):  # "auto" is known once NVML has been asked: checked as the supervisor starts
            unknown = [d for d in mode.devices if d not in device_names(known)]
            if unknown:
                message = f"{unknown[0]!r} is not one of [supervisor] devices {device_names(known)}"
                raise where.error(f"modes.{mode.name}", "devices", message)
        elif known is None and mode.devices:
            raise where.error(f"modes.{mode.name}", "devices", "names devices, but [supervisor] devices is not set")
    if "drain_timeout" in daemon_table:
        daemon_table = {**daemon_table, "drain_timeout": float(daemon_table["drain_timeout"])}
    http = parse_http(where, data["http"], modes, base or Path.cwd()) if "http" in data else None
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
