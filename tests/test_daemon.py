"""``gpuvisor serve`` as a real subprocess, driven by real clients: many at
once, malformed input, the socket's permissions and ownership, signals,
reload, sd_notify, the CLI's exit codes."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from concurrent.futures import CancelledError

import pytest
import zmq

from supervisor import DaemonUnavailable, JobCancelled, JobFailed, UnknownTask, WorkerCrashed
from supervisor.client import AsyncClient, Client
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import free_port, stale_socket

MODES = {"diag": DIAG, "diag2": DIAG}
TWO_MODES = config_text(MODES)


def cli(*args: str, timeout: float = T) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.service.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


# ---------------------------------------------------------------- clients


@pytest.mark.daemon
def test_many_concurrent_clients_each_get_every_answer_once_and_right(daemon):
    d = daemon(config_text=TWO_MODES)
    errors: list[str] = []
    counts: dict[tuple[int, int], int] = {}
    lock = threading.Lock()

    def one_client(n: int) -> None:
        mode = "diag2" if n % 10 == 9 else "diag"  # two of twenty use the other mode: mixed, without a switch per job
        jobs = 20 if mode == "diag2" else 200
        with d.client() as c:
            futures = [(i, c.submit("echo", {"n": n, "i": i}, mode=mode)) for i in range(jobs)]
            for i, f in futures:
                value = f.result(T)
                with lock:
                    counts[(n, i)] = counts.get((n, i), 0) + 1
                if value != {"n": n, "i": i}:
                    errors.append(f"client {n} job {i} got {value}")

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 2)
    assert errors == []
    assert len(counts) == 18 * 200 + 2 * 20 and set(counts.values()) == {1}


@pytest.mark.daemon
def test_the_client_api_mirrors_the_supervisor(daemon):
    d = daemon()
    with d.client() as c:
        assert c.ping()["pong"] is True
        assert c.switch_mode("diag").result(T)["status"] == "loaded"
        assert c.switch_mode("diag").result(T)["status"] == "already_loaded"
        assert c.submit("echo", [1, "two", b"3"]).result(T) == [1, "two", b"3"]
        with pytest.raises(JobFailed, match="on purpose"):
            c.submit("fail", {"message": "on purpose"}).result(T)
        with pytest.raises(UnknownTask):
            c.submit("nope").result(T)
        slow = c.submit("sleep", {"seconds": 1})
        sent_ahead = [c.submit("echo", i) for i in range(c.status()["window"] - 1)]  # handed to the worker with it
        queued = c.submit("echo", "never")
        wait_until(lambda: c.status()["in_flight"] >= 1, T, "the sleep to start")
        assert queued.cancel() is True  # the daemon's word: it was queued, it will never run
        with pytest.raises(CancelledError):
            queued.result(T)
        assert slow.cancel() is False  # running: the daemon says so
        assert slow.result(T) == {"slept": 1} and [f.result(T) for f in sent_ahead] == list(range(len(sent_ahead)))
        status = c.status()
        assert status["mode"] == "diag" and status["daemon_pid"] == d.proc.pid and status["endpoint"] == d.endpoint
        assert c.restart().result(T)["status"] == "restarted"

    async def use_async():
        client = AsyncClient(d.endpoint)
        try:
            assert await client.submit("echo", 7) == 7
            assert (await client.status())["state"] == "running"
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(use_async(), T))


@pytest.mark.process
def test_nothing_answering_is_daemon_unavailable(tmp_path):
    with Client(f"ipc://{tmp_path}/nobody.sock", timeout=0.3) as c:
        with pytest.raises(DaemonUnavailable, match="is `gpuvisor serve` running"):
            c.ping()
        with pytest.raises(DaemonUnavailable):
            c.submit("echo", 1).result(T)


@pytest.mark.daemon
def test_malformed_and_oversized_client_frames_get_errors_and_the_daemon_goes_on(daemon):
    import msgpack

    d = daemon()
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.RCVTIMEO, T * 1000)
    raw.connect(d.endpoint)
    try:
        for frame in (b"\xc1junk", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "k": "submit", "id": 5}),
                      msgpack.packb({"v": 1, "k": "teleport", "id": "x"}), b"\x00" * (64 * 1024 * 1024 + 10)):  # fmt: skip
            raw.send(frame)
            reply = msgpack.unpackb(raw.recv(), raw=False)
            assert reply["ok"] is False and reply["error"]["code"] == "protocol_error", reply
        assert reply["id"] is None
        raw.send_multipart([msgpack.packb({"v": 1, "k": "ping", "id": 1}), b"extra frame"])
        assert msgpack.unpackb(raw.recv(), raw=False)["error"]["code"] == "protocol_error"
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(d.endpoint)
        big.send(b"\x00" * (64 * 1024 * 1024 + 100_000))  # past MAXMSGSIZE: libzmq drops this client
        big.close()
        with d.client() as c:
            assert c.ping()["pong"] is True
            assert c.submit("echo", "still serving", mode="diag").result(T) == "still serving"
    finally:
        raw.close()
        ctx.term()


@pytest.mark.daemon
def test_replies_for_a_client_that_went_away_are_dropped_harmlessly(daemon):
    d = daemon()
    c = d.client()
    orphan = c.submit("sleep", {"seconds": 0.5}, mode="diag")
    with d.client() as other:
        wait_until(lambda: other.status()["in_flight"] >= 1, T, "the job to reach the worker")
        c.close()  # its reply has nowhere to go
        with pytest.raises(DaemonUnavailable, match="closed"):
            orphan.result(T)
        wait_until(lambda: other.status()["jobs_done"] >= 1, T, "the orphaned job to finish")
        assert other.ping()["pong"] is True
        assert other.submit("echo", "next").result(T) == "next"


# ---------------------------------------------------------------- the socket


@pytest.mark.daemon
def test_the_directory_and_socket_are_private_whatever_the_umask(daemon):
    d = daemon(umask=0)
    path = d.endpoint[len("ipc://") :]
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.daemon
def test_a_socket_group_gets_0660(daemon):
    group = grp.getgrgid(os.getgid()).gr_name
    d = daemon(config_text=config_text(MODES, daemon={"socket_group": group}), umask=0)
    path = d.endpoint[len("ipc://") :]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660 and os.stat(path).st_gid == os.getgid()
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o710


@pytest.mark.daemon
def test_a_second_daemon_on_the_same_endpoint_is_refused_and_the_first_keeps_serving(daemon):
    first = daemon()
    second = daemon("--endpoint", first.endpoint, wait_ready=False)
    assert second.wait() == 1
    assert "another gpuvisor daemon is serving" in second.output()
    with first.client() as c:
        assert c.ping()["pid"] == first.proc.pid


@pytest.mark.daemon
def test_a_stale_socket_file_is_replaced(daemon, tmp_path):
    short = os.path.join("/tmp", f"gv-stale-{os.getpid()}")
    os.makedirs(short, mode=0o700, exist_ok=True)
    path = os.path.join(short, "g.sock")
    stale_socket(path)
    try:
        d = daemon("--endpoint", f"ipc://{path}")
        with d.client() as c:
            assert c.ping()["pong"] is True
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.daemon
def test_tcp_is_refused_off_loopback_and_served_on_it(daemon):
    exposed = daemon("--endpoint", "tcp://0.0.0.0:0", wait_ready=False)
    assert exposed.wait() == 6
    assert "use ipc://, a loopback address" in exposed.output()
    port = free_port()
    daemon(
        "--endpoint",
        f"tcp://127.0.0.1:{port}",
        config_text=config_text(MODES, daemon={"allow_unauthenticated_tcp": True}),
    )
    with Client(f"tcp://127.0.0.1:{port}") as c:
        assert c.ping()["pong"] is True


@pytest.mark.daemon
def test_curve_lets_in_only_the_clients_whose_keys_are_listed(daemon, tmp_path):
    import zmq.auth

    keys, clients = tmp_path / "keys", tmp_path / "clients"
    keys.mkdir()
    clients.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(str(keys), "server")
    client_public, client_secret = zmq.auth.create_certificates(str(keys), "client")
    os.rename(client_public, clients / "client.key")
    _, stranger_secret = zmq.auth.create_certificates(str(keys), "stranger")
    port = free_port()
    d = daemon(
        "--endpoint",
        f"tcp://127.0.0.1:{port}",
        config_text=config_text(
            MODES, daemon={"curve_secret_key": str(server_secret), "curve_clients_dir": str(clients)}
        ),
    )
    server_key, _ = zmq.auth.load_certificate(server_public)
    with Client(f"tcp://127.0.0.1:{port}", curve_server_key=server_key, curve_client_cert=client_secret) as c:
        assert c.ping()["pid"] == d.proc.pid
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.5, curve_server_key=server_key,
                curve_client_cert=stranger_secret) as c:  # fmt: skip
        with pytest.raises(DaemonUnavailable):
            c.ping()
    with Client(f"tcp://127.0.0.1:{port}", timeout=0.5) as c:  # no keys at all
        with pytest.raises(DaemonUnavailable):
            c.ping()


# ---------------------------------------------------------------- systemd and signals


@pytest.mark.daemon
def test_sd_notify_ready_after_bind_then_status_watchdog_and_stopping(daemon):
    d = daemon(env={"WATCHDOG_USEC": "200000"})
    path = d.endpoint[len("ipc://") :]
    assert os.path.exists(path), "READY=1 came before the socket was bound"
    with d.client() as c:
        c.switch_mode("diag").result(T)
        pid = c.submit("pid").result(T)
    d.wait_note("STATUS=")
    wait_until(lambda: any(f"worker {pid}" in n for n in d.notes), T, "a STATUS line naming the worker")
    first = d.wait_note("WATCHDOG=1")
    d.wait_note("WATCHDOG=1", after=first + 1)
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    assert not any(v.startswith((b"NOTIFY_SOCKET=", b"WATCHDOG_")) for v in environ), "leaked into the worker"
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait() == 0
    d.wait_note("STOPPING=1")


@pytest.mark.daemon
def test_sigterm_drains_the_queue_then_exits_0(daemon):
    d = daemon()
    with d.client() as c:
        c.switch_mode("diag").result(T)
        futures = [c.submit("sleep", {"seconds": 0.2}) for _ in range(5)]
        wait_until(lambda: c.status()["in_flight"] >= 1, T, "the first job to start")
        os.kill(d.proc.pid, signal.SIGTERM)
        assert [f.result(T) for f in futures] == [{"slept": 0.2}] * 5
    assert d.wait() == 0
    stopping = d.wait_note("STOPPING=1")
    d.wait_note("EXTEND_TIMEOUT_USEC=", after=stopping)  # asks systemd for time while the drain runs
    assert "drained and exited with code 0" in d.output()


@pytest.mark.daemon
def test_a_second_sigint_stops_at_once_and_cancels_the_queue(daemon):
    d = daemon()
    with d.client() as c:
        c.switch_mode("diag").result(T)
        running = c.submit("sleep", {"seconds": 30})
        queued = c.submit("echo", "never")
        wait_until(lambda: c.status()["in_flight"] >= 1, T, "the long job to start")
        os.kill(d.proc.pid, signal.SIGINT)
        d.wait_note("STOPPING=1")
        os.kill(d.proc.pid, signal.SIGINT)
        for f in (running, queued):
            with pytest.raises(JobCancelled):
                f.result(T)
    assert d.wait() == 0


@pytest.mark.daemon
def test_sighup_reloads_the_mode_table_and_keeps_it_if_the_file_is_broken(daemon):
    d = daemon(config_text=TWO_MODES)
    with d.client() as c:
        c.switch_mode("diag").result(T)
        with open(d.config, "a") as f:
            f.write(config_text({"extra": DIAG}))
        ready = d.notes.index("READY=1")
        os.kill(d.proc.pid, signal.SIGHUP)
        d.wait_note("READY=1", after=ready + 1)
        assert "extra" in c.status()["modes"]
        assert c.switch_mode("extra").result(T)["status"] == "loaded"
        with open(d.config, "w") as f:
            f.write("[modes.broken\n")
        os.kill(d.proc.pid, signal.SIGHUP)
        wait_until(lambda: "keeping the running configuration" in d.output(), T, "the reload to be refused")
        assert c.switch_mode("diag").result(T)["status"] == "loaded"


# ---------------------------------------------------------------- the CLI


@pytest.mark.daemon
def test_every_cli_exit_code(daemon, write_config):
    d = daemon()
    ep = ["--endpoint", d.endpoint]
    ok = cli(*ep, "submit", "echo", '{"x": 1}', "--mode", "diag")
    assert ok.returncode == 0 and '"x": 1' in ok.stdout
    status = cli(*ep, "--json", "status")
    assert status.returncode == 0 and '"ok": true' in status.stdout and '"mode": "diag"' in status.stdout
    assert cli(*ep, "switch", "diag").returncode == 0
    failed = cli(*ep, "submit", "fail")
    assert failed.returncode == 1 and "JobFailed" in failed.stderr
    assert cli(*ep, "switch", "nope").returncode == 1
    assert cli(*ep, "submit", "echo", "{not json").returncode == 2
    assert cli(*ep, "frobnicate").returncode == 2
    nobody = cli("--endpoint", "ipc:///tmp/gv-nobody-here.sock", "--daemon-timeout", "0.3", "status")
    assert nobody.returncode == 3 and "DaemonUnavailable" in nobody.stderr
    bad = write_config('[modes.a]\nloader = "m:f"\nlaoder = 1\n')
    config_error = cli("--config", str(bad), "serve")
    assert config_error.returncode == 6
    assert f"{bad}:3: [modes.a] key 'laoder'" in config_error.stderr
    stop = cli(*ep, "stop")
    assert stop.returncode == 0 and d.wait() == 0


# ---------------------------------------------------------------- regressions from review


@pytest.mark.daemon
def test_a_client_that_never_reads_its_replies_cannot_wedge_the_daemon(daemon):
    import msgpack

    d = daemon()
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.DEALER)
    greedy.setsockopt(zmq.LINGER, 0)
    greedy.setsockopt(zmq.SNDTIMEO, 5000)
    greedy.connect(d.endpoint)
    try:
        for i in range(3500):  # replies pile up past the high-water mark: the daemon keeps them, never blocks
            greedy.send(msgpack.packb({"v": 1, "k": "status", "id": i}))
        with d.client() as c:
            assert c.ping()["pong"] is True
            assert c.submit("echo", "served", mode="diag").result(T) == "served"
    finally:
        greedy.close()
        ctx.term()
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait() == 0


@pytest.mark.process
def test_a_bad_endpoint_fails_at_once_and_the_cli_says_3():
    with pytest.raises(DaemonUnavailable, match="cannot connect to bogus://x"):
        Client("bogus://x")
    assert cli("--endpoint", "bogus://x", "status").returncode == 3


@pytest.mark.daemon
def test_requests_in_flight_when_the_daemon_dies_fail_even_if_a_new_one_takes_its_place(daemon):
    first = daemon()
    with first.client(timeout=5) as c:
        pending = c.submit("sleep", {"seconds": 3}, mode="diag")
        wait_until(lambda: c.status()["in_flight"] >= 1, T, "the job to start")
        first.proc.kill()
        first.wait()
        second = daemon("--endpoint", first.endpoint)  # Restart=on-failure: a new daemon, the same path
        with pytest.raises(DaemonUnavailable, match="lost the connection"):
            pending.result(T)
        assert c.ping()["pid"] == second.proc.pid, "the same client goes on with the new daemon"


@pytest.mark.daemon
@pytest.mark.parametrize(
    "args, config, words",
    [
        (("--endpoint", "ipc://@abstract"), None, "absolute file path"),
        (("--endpoint", "ipc://relative.sock"), None, "absolute file path"),
        (("--endpoint", "tcp://127.0.0.1:1"), {"curve_secret_key": "/nonexistent", "curve_clients_dir": "*"}, "'*' (any key) would authenticate nobody"),
    ],
)  # fmt: skip
def test_unsafe_endpoints_are_refused_with_exit_6(daemon, args, config, words):
    d = daemon(*args, config_text=config_text(MODES, daemon=config) if config else None, wait_ready=False)
    assert d.wait() == 6
    assert words in d.output()


@pytest.mark.daemon
def test_an_existing_socket_directory_is_checked_not_changed(daemon, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    d = daemon("--endpoint", f"ipc://{shared}/g.sock")
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755, "a directory we did not make keeps its mode"
    assert stat.S_IMODE(os.stat(shared / "g.sock").st_mode) == 0o600
    d.close()
    os.chmod(shared, 0o777)
    refused = daemon("--endpoint", f"ipc://{shared}/g.sock", wait_ready=False)
    assert refused.wait() == 6 and "writable by others" in refused.output()


# ---------------------------------------------------------------- streams and arrays through the daemon


@pytest.mark.daemon
def test_streams_and_arrays_cross_the_daemon(daemon):
    import numpy as np

    d = daemon(config_text=TWO_MODES)
    with d.client() as c:
        stream = c.submit("count", {"n": 30}, mode="diag", stream=True)
        assert list(stream) == list(range(30)) and stream.result(T) == {"count": 30}
        crashed = c.submit("count", {"n": 9, "die_after": 3, "delay": 0.2}, stream=True)
        got = []
        with pytest.raises(WorkerCrashed):
            for chunk in crashed:
                got.append(chunk)
        assert got == [0, 1, 2]
        arr = np.arange(300_000, dtype=np.float32).reshape(1000, 300)
        back = c.submit("echo", {"a": arr}).result(T)["a"]
        assert back.dtype == arr.dtype and back.shape == arr.shape and back.tobytes() == arr.tobytes()

    async def use_async():
        client = AsyncClient(d.endpoint)
        try:
            stream = await client.submit("count", {"n": 5}, stream=True)
            assert [chunk async for chunk in stream] == [0, 1, 2, 3, 4]
            assert await stream.result(T) == {"count": 5}
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(use_async(), T))


@pytest.mark.daemon
def test_the_cli_streams_chunks_as_json_lines(daemon):
    d = daemon(config_text=TWO_MODES)
    out = cli("--endpoint", d.endpoint, "--json", "submit", "count", '{"n": 3}', "--mode", "diag", "--stream")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines == [{"chunk": 0}, {"chunk": 1}, {"chunk": 2}, {"ok": True, "value": {"count": 3}}]


# ---------------------------------------------------------------- stopping, modes, a daemon that is not there


@pytest.mark.daemon
def test_a_stop_is_bounded_by_drain_timeout_and_asks_systemd_for_no_more(daemon):
    """SIGTERM drains, but for at most [daemon] drain_timeout: a job that
    would run past it is cancelled with JobCancelled, the worker is stopped,
    and every EXTEND_TIMEOUT_USEC stays inside the budget (plus the worker's
    stop_timeout), so the unit's TimeoutStopSec applies."""
    d = daemon(config_text=config_text(MODES, supervisor={"stop_timeout": 1.0}, daemon={"drain_timeout": 1.5}))
    with d.client() as c:
        c.switch_mode("diag").result(T)
        running = c.submit("sleep", {"seconds": 60})
        queued = c.submit("echo", "never runs")
        wait_until(lambda: c.status()["in_flight"] >= 1, T, "the long job to start")
        os.kill(d.proc.pid, signal.SIGTERM)
        with pytest.raises(JobCancelled, match="drain timeout"):
            queued.result(T)
        with pytest.raises(JobCancelled):
            running.result(T)
    assert d.wait() == 0
    asked = [int(n.split("=")[1]) / 1e6 for n in d.notes if n.startswith("EXTEND_TIMEOUT_USEC=")]
    assert asked and max(asked) <= 1.5 + 1.0 + 5.0, asked


@pytest.mark.daemon
def test_client_shutdown_returns_once_the_daemon_has_stopped(daemon):
    d = daemon()
    with d.client() as c:
        c.switch_mode("diag").result(T)
        jobs = [c.submit("sleep", {"seconds": 0.2}) for _ in range(3)]
        assert c.shutdown() is None  # like Supervisor.shutdown(): returns once stopped, after the drain
        assert [j.result(0) for j in jobs] == [{"slept": 0.2}] * 3  # done before it returned
    assert d.wait(T) == 0


@pytest.mark.daemon
def test_modes_lists_each_mode_its_loader_and_its_tasks_once_loaded(daemon):
    d = daemon(config_text=TWO_MODES)
    with d.client() as c:
        before = c.modes()
        assert before["diag"] == {"loader": "worker.modes.diag:load", "loaded": False, "devices": [], "tasks": None}
        c.switch_mode("diag").result(T)
        after = c.modes()
        assert after["diag"]["loaded"] is True and "echo" in after["diag"]["tasks"]
        assert after["diag2"]["tasks"] is None
    shown = cli("--endpoint", d.endpoint, "modes")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["MODE", "LOADED", "LOADER", "TASKS"]
    assert any(line.startswith("diag ") and "yes" in line and "echo" in line for line in lines)
    assert any(line.startswith("diag2 ") and "(known once loaded)" in line for line in lines)
    as_json = json.loads(cli("--endpoint", d.endpoint, "modes", "--json").stdout)
    assert as_json["value"]["diag"]["loaded"] is True


@pytest.mark.process
def test_a_client_learns_at_once_that_no_daemon_is_there(tmp_path):
    """No socket file, or a stale one that refuses: the first request fails
    with the reason, without waiting for the silence timeout (10 s here)."""
    stale = tmp_path / "stale.sock"
    stale_socket(stale)
    for endpoint, words in ((f"ipc://{tmp_path}/none.sock", "no socket file"), (f"ipc://{stale}", "refuses")):
        with Client(endpoint, timeout=10.0) as c:
            with pytest.raises(DaemonUnavailable, match=words):
                c.status()
            with pytest.raises(DaemonUnavailable, match=words):
                c.submit("echo", 1).result(T)
