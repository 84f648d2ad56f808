"""The ``gpuvisor`` console script as a user runs it: options on either side
of the command, usage errors, "not running" at once, what people read, and
what ``serve`` refuses (plain TCP, a socket group shut out of its directory)."""

from __future__ import annotations

import grp
import importlib.metadata
import itertools
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from supervisor.client import Client
from tests.helpers import T
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import GPUVISOR, RunningDaemon, free_port, stale_socket

CLI_MODES = {"diag": DIAG, "cli": "tests.helpers.loaders:vectors_and_words"}


def gpuvisor(*args: str, env: dict | None = None, timeout: float = T) -> subprocess.CompletedProcess:
    """The console script, to the end. ``timeout`` only stops a hang."""
    return subprocess.run([GPUVISOR, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture
def served(daemon):
    """``served(*argv)``: ``gpuvisor *argv`` (a ``serve`` line) started through
    the console script; the test asks ``ready()`` itself."""

    def start(*argv: str, **kwargs) -> RunningDaemon:
        return daemon(argv=[GPUVISOR, *argv], wait_ready=False, **kwargs)

    return start


@pytest.fixture
def short_dir():
    """A directory whose socket paths stay under AF_UNIX's 108 bytes."""
    with tempfile.TemporaryDirectory(prefix="gv-") as d:
        yield Path(d)


# ---------------------------------------------------------------- options on either side


@pytest.mark.daemon
def test_shared_options_work_before_and_after_the_command(served, short_dir):
    endpoint = f"ipc://{short_dir}/run/g.sock"
    config = short_dir / "g.toml"
    config.write_text(config_text(CLI_MODES))
    daemon = served("serve", "--config", str(config), "--endpoint", endpoint, "-v")
    assert daemon.ready(), daemon.output()
    for args in (
        ["--endpoint", endpoint, "--json", "status"],
        ["status", "--endpoint", endpoint, "--json"],
        ["--json", "status", "--endpoint", endpoint],
        ["--endpoint", "ipc:///nonexistent/g.sock", "status", "--json", "--endpoint", endpoint],  # after wins
        ["status", "--json", "--config", str(short_dir / "none.toml"), "--endpoint", endpoint],
    ):
        out = gpuvisor(*args)
        assert out.returncode == 0, (args, out.stderr)
        reply = json.loads(out.stdout)
        assert reply["ok"] is True and reply["value"]["daemon_pid"] == daemon.proc.pid, args
        assert reply["value"]["http"] == [], "no [http]: no listener"
    no_http = gpuvisor("status", "--http-socket", "--endpoint", endpoint)
    assert no_http.returncode == 1 and no_http.stdout == "", no_http
    assert no_http.stderr == "gpuvisor: the daemon's HTTP listener has no unix socket: it serves no HTTP ([http])\n"
    out = gpuvisor("submit", "echo", '{"x": 1}', "--mode", "diag", "--endpoint", endpoint, "--daemon-timeout", "5")
    assert out.returncode == 0 and json.loads(out.stdout) == {"x": 1}, out.stderr
    # A client reads the endpoint from --config, given after the command too.
    config.write_text(config_text(CLI_MODES, daemon={"endpoint": endpoint}))
    out = gpuvisor("stop", "--config", str(config))
    assert out.returncode == 0, out.stderr
    assert daemon.proc.wait(T) == 0
    assert "DEBUG" in daemon.output(), "-v after serve did not reach the daemon"


@pytest.mark.process
def test_version_is_the_installed_package_version():
    out = gpuvisor("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"gpuvisor {importlib.metadata.version('gpuvisor')}"


@pytest.mark.daemon
@pytest.mark.parametrize(
    "args, words",
    [
        (["status", "--daemon-timeout", "0"], "--daemon-timeout: '0': expected a number of seconds > 0"),
        (["--daemon-timeout", "-1", "status"], "expected a number of seconds > 0"),
        (["--daemon-timeout", "nan", "status"], "expected a number of seconds > 0"),
        (["--daemon-timeout", "soon", "status"], "'soon' is not a number of seconds"),
        (["submit", "echo", "--timeout", "-1"], "--timeout/--job-timeout: '-1': expected a number of seconds >= 0"),
        (["submit", "echo", "--retries", "-1"], "--retries: '-1': expected a whole number >= 0"),
        (["submit", "count", "--stream", "--retries", "1"], "a streamed job cannot be retried"),
        (["serve", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(args, words):
    out = gpuvisor(*args, "--endpoint", "ipc:///nonexistent/g.sock")
    assert out.returncode == 2, out
    assert words in out.stderr and out.stderr.startswith("usage: gpuvisor"), out.stderr


# ---------------------------------------------------------------- nothing serves


@pytest.mark.process
@pytest.mark.parametrize("case", ["no directory", "no file", "stale file", "tcp refused"])
def test_nothing_serving_is_exit_3_at_once(short_dir, case):
    if case == "no directory":
        endpoint, says = f"ipc://{short_dir}/gone/g.sock", "there is no socket file"
    elif case == "no file":
        endpoint, says = f"ipc://{short_dir}/g.sock", "there is no socket file"
    elif case == "stale file":
        stale_socket(short_dir / "g.sock")
        endpoint, says = f"ipc://{short_dir}/g.sock", "refuses connections (a stale socket file"
    else:
        endpoint, says = f"tcp://127.0.0.1:{free_port()}", "refuses connections"
    # With a 300 s daemon-timeout, a client that waited for silence would run
    # for ten minutes: the subprocess timeout (a hang stopper) would fire.
    for args in (["status"], ["submit", "echo", "1"], ["stop"], ["--json", "switch", "diag"]):
        out = gpuvisor(*args, "--endpoint", endpoint, "--daemon-timeout", "300")
        assert out.returncode == 3, (args, out)
        shown = json.loads(out.stdout)["error"]["message"] if "--json" in args else out.stderr
        assert says in shown and "is `gpuvisor serve` running?" in shown, shown


@pytest.mark.process
def test_a_socket_this_user_may_not_reach_is_exit_3_with_the_reason(short_dir):
    private = short_dir / "private"
    private.mkdir()
    stale_socket(private / "g.sock")
    os.chmod(private, 0o700)
    argv = [GPUVISOR, "status", "--endpoint", f"ipc://{private}/g.sock"]
    if os.getuid() == 0:  # root passes every permission check: ask as root without capabilities
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("as root, the refusal needs setpriv (util-linux) to drop the capabilities")
        os.chown(private, 65534, 65534)
        out = subprocess.run([setpriv, "--bounding-set=-all", "--inh-caps=-all", *argv], capture_output=True,
                             text=True, timeout=T, stdin=subprocess.DEVNULL)  # fmt: skip
    else:
        os.chmod(private, 0o000)
        try:
            out = gpuvisor(*argv[1:])
        finally:
            os.chmod(private, 0o700)
    assert out.returncode == 3, out
    assert f"permission denied on {private}/g.sock: only the daemon's user" in out.stderr, out.stderr


# ---------------------------------------------------------------- what people read


@pytest.mark.daemon
def test_human_output_arrays_status_and_streams(served, short_dir):
    endpoint = f"ipc://{short_dir}/g.sock"
    config = short_dir / "g.toml"
    port = free_port()
    config.write_text(config_text(CLI_MODES) + f'[http]\nlisten = ["unix:http.sock", "127.0.0.1:{port}"]\n'
                      "allow_unauthenticated_tcp = true\n")  # fmt: skip
    daemon = served("serve", "--config", str(config), "--endpoint", endpoint)
    assert daemon.ready(), daemon.output()
    ep = ["--endpoint", endpoint]

    array = gpuvisor("submit", "vectors", "--mode", "cli", *ep)
    assert array.returncode == 0, array.stderr
    assert array.stdout == "float32 array (2, 384): [[-1.0000, -0.9974, ..., -0.0013], ...]\n"
    full = gpuvisor("submit", "vectors", "--json", *ep)
    values = json.loads(full.stdout)["value"]
    assert len(values) == 2 and len(values[0]) == 384 and values[1][-1] == 1.0

    stream = gpuvisor("submit", "words", '["Hello", ", ", "world"]', "--stream", *ep)
    assert stream.returncode == 0, stream.stderr
    assert stream.stdout == 'Hello, world\n{\n  "words": 3\n}\n'
    ended = gpuvisor("submit", "words", '["a line\\n"]', "--stream", *ep)
    assert ended.stdout == 'a line\n{\n  "words": 1\n}\n', "a blank line after a stream that ended its own line"
    silent = gpuvisor("submit", "words", "[]", "--stream", *ep)
    assert silent.stdout == '{\n  "words": 0\n}\n'

    status = gpuvisor("status", *ep)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    top = [line for line in lines if not line.startswith(" ")]
    fields = {key: rest.strip() for key, _, rest in (line.partition(":") for line in top)}
    columns = {re.match(r"^\w+:\s+", line).end() for line in top if line.partition(":")[2].strip()}
    assert len(columns) == 1, f"values not aligned: {status.stdout}"
    for i, line in enumerate(lines[:-1]):  # a nested map: its key alone, then its lines indented
        if not line.partition(":")[2].strip():
            assert lines[i + 1].startswith("  "), status.stdout
    assert fields["mode"] == "cli" and fields["daemon_pid"] == str(daemon.proc.pid)
    assert fields["modes"] == "cli, diag"
    assert re.fullmatch(r"\d+\.\d (KiB|MiB|GiB)", fields["worker_rss_bytes"]), fields["worker_rss_bytes"]
    assert fields["reclaiming"] == "no" and fields["last_error"] == "-"
    # Where HTTP listens, and the unix socket's path alone for curl.
    assert fields["http"] == f"unix:{short_dir}/http.sock, http://127.0.0.1:{port}"
    path = gpuvisor("status", "--http-socket", *ep)
    assert path.returncode == 0 and path.stdout == f"{short_dir}/http.sock\n", path
    # A list of maps (a status per device) as blocks under their key, each opened by "- ".
    devices = lines[lines.index("devices:") + 1 :]
    assert devices[0].startswith("  - name:") and devices[0].split()[-1] == "cpu", status.stdout
    block = list(itertools.takewhile(lambda line: line.startswith("    "), devices[1:]))
    assert "    mode:" in "\n".join(block) and block[0].index(block[0].split()[1]) == devices[0].index("cpu"), block


@pytest.mark.daemon
def test_the_configs_job_timeout_is_a_ceiling_a_client_cannot_lift(served, short_dir):
    """On main ``--timeout 0`` ran a job past the operator's job_timeout."""
    endpoint = f"ipc://{short_dir}/g.sock"
    config = short_dir / "g.toml"
    config.write_text(config_text(supervisor={"job_timeout": 0.5}))
    daemon = served("serve", "--config", str(config), "--endpoint", endpoint)
    assert daemon.ready(), daemon.output()
    ep = ["--endpoint", endpoint, "--mode", "diag"]
    for asked in (["--timeout", "0"], ["--timeout", "30"], []):
        limited = gpuvisor("submit", "sleep", '{"seconds": 3}', *asked, *ep)
        assert limited.returncode == 1 and "JobTimeout" in limited.stderr and "0.5s timeout" in limited.stderr, limited
    shorter = gpuvisor("submit", "sleep", '{"seconds": 0.2}', "--timeout", "0.4", *ep)
    assert shorter.returncode == 0 and json.loads(shorter.stdout) == {"slept": 0.2}, shorter.stderr


@pytest.mark.process
def test_demo_prints_the_tour_without_log_lines_or_library_warnings():
    out = gpuvisor("demo", env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=4 * T)
    assert out.returncode == 0, out.stderr
    assert "switch_mode('embed')" in out.stdout and "streamed tokens" in out.stdout
    assert "submit('chat'" in out.stdout, "chat works on the built-in config"
    assert "status(): running, mode 'diag' in worker pid" in out.stdout
    assert "{'state'" not in out.stdout, "the status in words, not the whole dict"
    assert " INFO " not in out.stdout + out.stderr
    assert "Warning" not in out.stderr and "deprecated" not in out.stderr, out.stderr


# ---------------------------------------------------------------- what serve refuses


@pytest.mark.daemon
def test_plain_tcp_needs_allow_unauthenticated_tcp_and_is_logged(served, short_dir):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = short_dir / "g.toml"
    config.write_text(config_text())
    refused = served("serve", "--config", str(config), "--endpoint", endpoint)
    assert not refused.ready() and refused.stop() == 6
    assert "allow_unauthenticated_tcp = true" in refused.output() and endpoint in refused.output()

    config.write_text(config_text(daemon={"allow_unauthenticated_tcp": True}))
    daemon = served("serve", "--config", str(config), "--endpoint", endpoint)
    assert daemon.ready(), daemon.output()
    with Client(endpoint) as c:
        assert c.ping()["pid"] == daemon.proc.pid
    assert daemon.stop() == 0
    warning = [line for line in daemon.output().splitlines() if " WARNING " in line and endpoint in line]
    assert warning and "without authentication" in warning[0], daemon.output()


@pytest.mark.daemon
def test_a_socket_group_shut_out_of_an_existing_directory_is_refused(served, short_dir):
    group = grp.getgrgid(os.getgid()).gr_name
    run = short_dir / "run"
    run.mkdir()
    os.chmod(run, 0o700)  # what RuntimeDirectoryMode=0700 makes
    config = short_dir / "g.toml"
    config.write_text(config_text(daemon={"endpoint": f"ipc://{run}/g.sock", "socket_group": group}))
    refused = served("serve", "--config", str(config))
    assert not refused.ready() and refused.stop() == 6
    said = refused.output()
    assert f"socket_group {group!r} cannot reach the socket: its directory {run} is mode 0700" in said, said
    assert "RuntimeDirectoryMode=0710" in said
    assert not (run / "g.sock").exists()

    others = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if others:  # 0710, but for another group than socket_group's
        os.chmod(run, 0o710)
        config.write_text(config_text(daemon={"endpoint": f"ipc://{run}/g.sock", "socket_group": others[0].gr_name}))
        wrong = served("serve", "--config", str(config))
        assert not wrong.ready() and wrong.stop() == 6
        assert f"is mode 0710, group {group}" in wrong.output(), wrong.output()

    os.chown(run, -1, os.getgid())
    os.chmod(run, 0o710)  # the shipped unit's RuntimeDirectoryMode, the group its Group=
    config.write_text(config_text(daemon={"endpoint": f"ipc://{run}/g.sock", "socket_group": group}))
    daemon = served("serve", "--config", str(config))
    assert daemon.ready(), daemon.output()
    st = os.stat(run / "g.sock")
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o710, "a directory the daemon did not make keeps its mode"
    assert daemon.stop() == 0
