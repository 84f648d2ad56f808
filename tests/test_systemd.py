"""systemd integration: the notify protocol over real sockets, the journal
log format in a real child process, and the unit file through systemd-analyze."""

from __future__ import annotations

import grp
import io
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from supervisor.service.logsetup import journal_priority, stderr_is_journal
from supervisor.service.sdnotify import Notifier
from tests.helpers import ROOT, T
from tests.helpers.config import config_text
from tests.helpers.daemon import GPUVISOR
from tests.helpers.notify import NotifyReceiver

UNIT = ROOT / "contrib" / "systemd" / "gpuvisor.service"
SAMPLE = ROOT / "contrib" / "systemd" / "gpuvisor.toml"

# --- sd_notify ------------------------------------------------------------


@pytest.fixture
def short_dir(tmp_path):
    """tmp_path, unless its socket path would pass AF_UNIX's 108-byte limit
    (long test names make long tmp_paths); then a short directory in /tmp."""
    if len(str(tmp_path / "notify.sock")) < 100:
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="gv-sd-") as d:
        yield Path(d)


@pytest.fixture
def receiver(short_dir):
    """systemd's side, at a path."""
    with NotifyReceiver(str(short_dir / "notify.sock")) as r:
        yield r


@pytest.fixture
def abstract_receiver():
    """systemd's side, at an abstract address."""
    with NotifyReceiver() as r:
        yield r


def assert_nothing_pending(receiver: NotifyReceiver) -> None:
    with pytest.raises(TimeoutError):
        receiver.next(0.05)


def exercise(notifier: Notifier, receiver: NotifyReceiver) -> None:
    assert notifier.enabled
    assert notifier.ready() is True
    assert receiver.next() == "READY=1"
    assert notifier.status("serving: embed") is True
    assert receiver.next() == "STATUS=serving: embed"
    assert notifier.stopping() is True
    assert receiver.next() == "STOPPING=1"
    assert notifier.extend_timeout(90) is True
    assert receiver.next() == "EXTEND_TIMEOUT_USEC=90000000"
    assert notifier.extend_timeout(1.5) is True
    assert receiver.next() == "EXTEND_TIMEOUT_USEC=1500000"
    assert notifier.watchdog() is True
    assert receiver.next() == "WATCHDOG=1"
    assert notifier.send("READY=1", "STATUS=two lines, one datagram") is True
    assert receiver.next() == "READY=1\nSTATUS=two lines, one datagram"
    assert_nothing_pending(receiver)


@pytest.mark.process
def test_notify_to_path_socket(receiver):
    exercise(Notifier.from_environ({"NOTIFY_SOCKET": receiver.address}), receiver)


@pytest.mark.process
def test_notify_to_abstract_socket(abstract_receiver):
    address = abstract_receiver.address
    assert address.startswith("@")
    exercise(Notifier.from_environ({"NOTIFY_SOCKET": address}), abstract_receiver)


@pytest.mark.process
def test_reloading_carries_monotonic_usec(receiver):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.next().split("\n")
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.process
def test_status_changed_sends_only_changes(receiver):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.address})
    assert notifier.status_changed("idle") is True
    assert receiver.next() == "STATUS=idle"
    assert notifier.status_changed("idle") is False
    assert notifier.status_changed("idle") is False
    assert_nothing_pending(receiver)
    assert notifier.status_changed("busy") is True
    assert receiver.next() == "STATUS=busy"
    assert notifier.status_changed("idle") is True
    assert receiver.next() == "STATUS=idle"
    # A plain status() counts as the last one sent.
    assert notifier.status("loading") is True
    assert receiver.next() == "STATUS=loading"
    assert notifier.status_changed("loading") is False
    assert_nothing_pending(receiver)


@pytest.mark.process
def test_status_is_one_line(receiver):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": receiver.address})
    assert notifier.status("failed:\nREADY=1") is True
    assert receiver.next() == "STATUS=failed: READY=1"


@pytest.mark.process
def test_missing_socket_returns_false_and_warns_once(short_dir, caplog):
    path = short_dir / "nobody-listens.sock"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="gpuvisor"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status_changed("idle") is False
    warnings = [r for r in caplog.records if r.name == "gpuvisor" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "nobody-listens.sock" in warnings[0].getMessage()
    # A status that failed to go out is not remembered as sent: once the
    # socket is there, the same text goes out.
    with NotifyReceiver(str(path)) as receiver:
        assert notifier.status_changed("idle") is True
        assert receiver.next() == "STATUS=idle"


@pytest.mark.unit
def test_disabled_is_a_noop():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    assert notifier.ready() is False
    assert notifier.status_changed("idle") is False
    assert notifier.watchdog_interval is None


@pytest.mark.unit
def test_unsupported_address_returns_false(caplog):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative/path.sock"})
    with caplog.at_level(logging.WARNING, logger="gpuvisor"):
        assert notifier.ready() is False
    assert "unsupported NOTIFY_SOCKET" in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
    ],
    ids=["ours-implicit", "ours", "other-pid", "bad-pid", "usec-unset", "nothing", "zero", "bad-usec", "small"],
)
def test_watchdog_interval(environ, expected):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert notifier.watchdog_interval == expected


# --- logging --------------------------------------------------------------

CHILD = """
import logging, os, sys
if sys.argv[1] == "journal":
    st = os.fstat(2)  # what systemd does for the stream it hands us
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
elif sys.argv[1] == "stale":
    os.environ["JOURNAL_STREAM"] = "1:1"  # inherited, but stderr was redirected since
from supervisor.service.logsetup import configure_logging
configure_logging(verbose=True)
configure_logging(verbose=True)  # idempotent: still one handler
log = logging.getLogger("gpuvisor")
log.debug("dbg line")
log.info("info line")
log.warning("warn line")
log.error("error line")
log.critical("crit line")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
logging.getLogger("somelib").info("from a library")
"""


def run_child(mode: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        stdin=subprocess.DEVNULL,
        capture_output=True,  # stderr is a pipe: not journald's, whatever the parent's was
        env=env,
        cwd=ROOT,
        timeout=T,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    return proc.stderr.splitlines()


@pytest.mark.process
def test_journal_stream_gets_priority_prefixes():
    lines = run_child("journal")
    assert lines[:5] == [
        "<7>DEBUG dbg line",
        "<6>INFO info line",
        "<4>WARNING warn line",
        "<3>ERROR error line",
        "<2>CRITICAL crit line",
    ]
    # The traceback: every line keeps the record's priority.
    assert lines[5] == "<3>ERROR boom"
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-2] == "<3>ZeroDivisionError: division by zero"
    assert all(line.startswith("<3>") for line in lines[5:-1])
    assert lines[-1] == "<6>INFO from a library"
    assert not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), "journald adds its own timestamp"


@pytest.mark.process
@pytest.mark.parametrize("mode", ["plain", "stale"])
def test_plain_stderr_has_timestamps_and_no_prefix(mode):
    lines = run_child(mode)
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" gpuvisor DEBUG dbg line", lines[0]), lines
    assert re.fullmatch(stamp + r" gpuvisor INFO info line", lines[1]), lines
    assert re.fullmatch(stamp + r" gpuvisor ERROR error line", lines[3]), lines
    assert re.fullmatch(stamp + r" gpuvisor INFO from a library", lines[-1]), lines
    assert not any(re.match(r"<\d>", line) for line in lines), lines
    assert sum("info line" in line for line in lines) == 1, "configure_logging twice added a second handler"


@pytest.mark.unit
def test_journal_priority_levels():
    assert [journal_priority(n) for n in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]
    assert journal_priority(logging.INFO + 5) == 6
    assert journal_priority(logging.CRITICAL + 10) == 2
    assert journal_priority(logging.NOTSET) == 7


@pytest.mark.unit
def test_stderr_is_journal_compares_device_and_inode(tmp_path):
    with open(tmp_path / "log", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        good = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stderr_is_journal(f, good) is True
        assert stderr_is_journal(g, good) is False
        assert stderr_is_journal(f, {}) is False
        assert stderr_is_journal(f, {"JOURNAL_STREAM": "garbage"}) is False
        assert stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:x"}) is False
    assert stderr_is_journal(io.StringIO(), good) is False  # no file descriptor
    assert stderr_is_journal(f, good) is False  # closed


# --- the unit file --------------------------------------------------------


def unit_directives(text: str | None = None) -> list[tuple[str, str]]:
    """(key, value) for every directive, in order (comments and sections out)."""
    lines = (UNIT.read_text() if text is None else text).splitlines()
    pairs = [line.strip().split("=", 1) for line in lines if "=" in line and not line.lstrip().startswith(("#", ";"))]
    return [(key, value) for key, value in pairs]


def unit_value(key: str) -> str:
    values = [value for k, value in unit_directives() if k == key]
    assert len(values) == 1, f"{key}= appears {len(values)} times in the unit"
    return values[0]


def exec_start(config: str) -> list[str]:
    """The unit's own ExecStart line with two substitutions: its example
    executable becomes this venv's console script, its config path ``config``.
    Everything else is as shipped."""
    argv = shlex.split(unit_value("ExecStart"))
    assert argv[0].endswith("/gpuvisor") and "--config" in argv, argv
    argv[0] = GPUVISOR
    argv[argv.index("--config") + 1] = config
    return argv


def unit_with_real_exec_start(tmp_path: Path) -> Path:
    """The unit as shipped but for ExecStart's executable (and config path),
    which must exist for systemd-analyze to judge the unit."""
    original = UNIT.read_text()
    line = shlex.join(exec_start(str(tmp_path / "gpuvisor.toml")))
    rewritten, n = re.subn(r"(?m)^ExecStart=.*$", lambda m: f"ExecStart={line}", original)
    assert n == 1
    unit = tmp_path / "gpuvisor.service"
    unit.write_text(rewritten)
    return unit


@pytest.mark.unit
def test_unit_has_the_directives_the_daemon_relies_on():
    directives = {f"{key}={value}" for key, value in unit_directives()}
    for needed in (
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=mixed",
        "Restart=on-failure",
        "RestartPreventExitStatus=2 6",  # usage and configuration: a restart cannot fix them
        "RuntimeDirectory=gpuvisor",
        "RuntimeDirectoryMode=0710",  # socket_group = the unit's Group= can reach the socket
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=gpuvisor",
        "DevicePolicy=closed",
        "DeviceAllow=char-nvidia* rw",  # every NVIDIA device group, whatever the driver version calls them
    ):
        assert needed in directives, needed
    assert any(d.startswith("TimeoutStopSec=") for d in directives)
    assert any(d.startswith("WatchdogSec=") for d in directives)
    assert "PrivateDevices=yes" not in directives, "PrivateDevices hides /dev/nvidia*"
    assert "MemoryDenyWriteExecute=yes" not in directives, "CUDA's JIT needs writable executable memory"
    home = dict(unit_directives())
    assert any(v.startswith("HF_HOME=%S/gpuvisor") for k, v in unit_directives() if k == "Environment")
    assert home["StateDirectory"] == "gpuvisor" and home["CacheDirectory"] == "gpuvisor"


def _analyze(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``systemd-analyze ARGS UNIT`` over the unit as shipped (its ExecStart
    made real); the test is skipped where there is no systemd-analyze."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package: systemd)")
    unit = unit_with_real_exec_start(tmp_path)
    return subprocess.run([analyze, *args, str(unit)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=T, check=False)  # fmt: skip


@pytest.mark.process
def test_unit_passes_systemd_analyze_verify(tmp_path):
    proc = _analyze(tmp_path, "verify", "--man=no")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    # Unknown keys and bad values are warnings with exit status 0; they name
    # the file and line. Lines about the host (no running systemd, other
    # units) are not ours to judge.
    about_us = [line for line in output.splitlines() if "gpuvisor.service" in line]
    assert about_us == [], output


@pytest.mark.process
def test_unit_exposure_is_at_most_4(tmp_path):
    proc = _analyze(tmp_path, "security", "--offline=yes", "--no-pager")
    output = proc.stdout + proc.stderr
    if "--offline" in output and "unrecognized option" in output:
        pytest.skip(f"this systemd-analyze cannot judge a unit offline (systemd 252 can): {output.strip()}")
    found = re.search(r"Overall exposure level for gpuvisor\.service: (\d+\.\d+) (\w+)", output)
    assert found, output
    print(f"systemd-analyze security: {found.group(1)} {found.group(2)}")
    assert float(found.group(1)) <= 4.0, output


def units_directories(base: Path) -> dict[str, str | None]:
    """What systemd gives the unit's ExecStart under ``base``: the
    environment (the unit's Environment= lines, no PYTHONPATH: the unit sets
    none) and the RuntimeDirectory (``base``/run, with the unit's mode),
    StateDirectory and CacheDirectory it names."""
    run, state, cache = (base / name for name in ("run", "state", "cache"))
    run.mkdir()
    os.chmod(run, int(unit_value("RuntimeDirectoryMode"), 8))
    for directory in (state / "gpuvisor", cache / "gpuvisor"):
        directory.mkdir(parents=True)
    env: dict[str, str | None] = {"XDG_RUNTIME_DIR": None, "JOURNAL_STREAM": None, "PYTHONPATH": None}
    for key, value in unit_directives():
        if key == "Environment":
            name, _, setting = value.partition("=")
            env[name] = setting.replace("%S", str(state)).replace("%C", str(cache))
    env["RUNTIME_DIRECTORY"] = str(run)
    env["STATE_DIRECTORY"] = str(state / "gpuvisor")
    return env


@pytest.mark.daemon
def test_the_units_own_exec_start_serves_and_stops_on_sigterm(daemon):
    """The ExecStart line as systemd would run it: from /, with the unit's
    umask and Environment= lines, a RuntimeDirectory made with the unit's
    mode and group, and the documented group access (socket_group = the
    unit's Group=, here this process's group)."""
    group = grp.getgrgid(os.getgid()).gr_name
    with tempfile.TemporaryDirectory(prefix="gv-unit-") as base:
        env = units_directories(Path(base))
        config = Path(base) / "gpuvisor.toml"
        config.write_text(config_text(daemon={"socket_group": group}))
        socket_file = Path(base) / "run" / "gpuvisor.sock"
        d = daemon(argv=exec_start(str(config)), endpoint=f"ipc://{socket_file}", env=env, cwd="/",
                   umask=int(unit_value("UMask"), 8))  # fmt: skip
        st = os.stat(socket_file)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
        with d.client() as client:
            assert client.ping()["pid"] == d.proc.pid
            assert client.submit("echo", "from the unit's line", mode="diag").result(T) == "from the unit's line"
        assert d.stop() == 0, d.output()
        assert not socket_file.exists(), "the daemon left its socket behind"


@pytest.mark.unit
def test_the_sample_config_mirrors_the_built_in_modes():
    """contrib/systemd/gpuvisor.toml is what an operator starts from: the
    modes and HTTP models a fresh install serves, and every operator setting
    commented out (the unit's defaults)."""
    sample = tomllib.loads(SAMPLE.read_text())
    built_in = tomllib.loads((ROOT / "supervisor" / "default.toml").read_text())
    assert sample["modes"] == built_in["modes"]
    assert sample["http"] == {"models": built_in["http"]["models"]}
    assert sample["supervisor"] == {} and sample["daemon"] == {}
    text = SAMPLE.read_text()
    for key in ("endpoint", "socket_group", "admin_group", "state_dir", "listen", "token_file"):
        assert re.search(rf"(?m)^# {key} = ", text), f"{key} is not shown (commented out) in the sample"


@pytest.mark.daemon
def test_the_units_exec_start_serves_the_sample_config(daemon):
    """The unit's ExecStart line, its --config naming the sample as shipped:
    it serves a job, and HTTP on the runtime directory's http.sock."""
    with tempfile.TemporaryDirectory(prefix="gv-unit-") as base:
        env = units_directories(Path(base))
        run = Path(base) / "run"
        d = daemon(argv=exec_start(str(SAMPLE)), endpoint=f"ipc://{run}/gpuvisor.sock", env=env, cwd="/",
                   umask=int(unit_value("UMask"), 8))  # fmt: skip
        with d.client() as client:
            assert client.submit("echo", "from the sample", mode="diag").result(T) == "from the sample"
            assert client.status()["http"] == [f"unix:{run}/http.sock"]
        assert d.stop() == 0, d.output()
