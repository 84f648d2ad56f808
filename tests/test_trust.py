"""No caller can hurt another, through the daemon's ZeroMQ door: each case
is a careless or hostile caller from the issue, tried against a real
``gpuvisor serve`` with real clients. One client cannot fill the queue for
the others, nor swell the daemon with a payload that decodes to far more
than it weighs, nor stop or switch the service, nor run past the
operator's ``job_timeout``, nor add metric series by making up task names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import uuid

import msgpack
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor import (
    DaemonUnavailable,
    Forbidden,
    JobTimeout,
    ModeLoadError,
    QueueFull,
    RequestTooLarge,
    Supervisor,
    UnknownTask,
)
from tests.helpers import T, repo_pythonpath, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.raw_client import RawClient

MODES = {"diag": DIAG, "other": DIAG}


# ---------------------------------------------------------------- a fair share of the queue


@pytest.mark.daemon
def test_a_client_that_fills_its_share_does_not_keep_another_clients_job_out(daemon):
    """On main, 3,000 jobs from one client made another client's single job
    fail with QueueFull. Now each client has a quarter of max_queue."""
    d = daemon(config_text=config_text(MODES, supervisor={"max_queue": 40, "default_mode": "diag"}))
    with d.client() as hog, d.client() as polite:
        wait_until(lambda: hog.status()["mode"] == "diag", T, "diag to load")
        blocker = hog.submit("sleep", {"seconds": 4})  # holds the hog's share while the polite client asks
        held = [hog.submit("echo", i) for i in range(9)]  # its share: 10 jobs in all
        with pytest.raises(QueueFull, match="this client already has 10 jobs.*max_queue_per_client"):
            hog.submit("echo", "one too many").result(T)
        mine = polite.submit("echo", "still served")  # admitted, and queued behind the hog's jobs
        assert blocker.result(T) == {"slept": 4}
        assert mine.result(T) == "still served"
        assert [f.result(T) for f in held] == list(range(9))


@pytest.mark.daemon
def test_a_job_larger_than_a_clients_byte_share_is_refused_before_it_is_queued(daemon):
    d = daemon(config_text=config_text(MODES, supervisor={"max_queue_bytes_per_client": 1 << 20}))
    with d.client() as c:
        with pytest.raises(RequestTooLarge, match="over max_queue_bytes_per_client"):
            c.submit("echo", b"x" * (2 << 20), mode="diag").result(T)
        assert c.submit("echo", b"y" * 1000, mode="diag").result(T) == b"y" * 1000


@pytest.mark.process
def test_switches_and_restarts_take_a_place_in_the_queue(write_config):
    with Supervisor(write_config(config_text(MODES, supervisor={"max_queue": 3}))) as sup:
        sup.switch_mode("diag").result(T)
        sup.submit("sleep", {"seconds": 0.5})
        switches = [sup.switch_mode("other"), sup.restart()]
        with pytest.raises(QueueFull, match="max_queue"):
            sup.switch_mode("diag").result(0)  # failed at once, as through the daemon
        for f in switches:
            f.result(T)
        assert sup.switch_mode("diag").result(T)["status"] == "loaded", "their places came back"


# ---------------------------------------------------------------- payloads stay bytes in the daemon


def _echo_growing(d, request_id: str, payload: bytes) -> tuple[dict, int]:
    """Echo ``payload`` (msgpack, sent as it is) through a fresh daemon in
    diag: the answer, and how much the daemon's RSS grew meanwhile. The
    worker still serves a plain job afterwards."""
    raw = RawClient(d.endpoint, timeout=T)
    try:
        wait_until(lambda: raw.call("status")["value"]["mode"] == "diag", T, "diag to load")
        daemon_proc = psutil.Process(d.proc.pid)
        before = daemon_proc.memory_info().rss
        raw._sock.send(_with_raw_payload({"v": 1, "k": "submit", "id": request_id, "task": "echo"}, payload))
        answer = raw.wait_for(request_id)
        grown = daemon_proc.memory_info().rss - before
        assert raw.call("submit", task="echo", payload=[1, 2])["value"] == [1, 2], "the worker serves on"
        return answer, grown
    finally:
        raw.close()


@pytest.mark.daemon
def test_a_payload_that_decodes_to_far_more_than_it_weighs_does_not_swell_the_daemon(daemon):
    """3.8 MB of empty arrays decoded to 282 MB in the daemon on main. The
    daemon now forwards a payload as the bytes it came as; the worker's
    decoder refuses an array of more than 1,048,576 items, and the job
    fails with its own error, under its own id."""
    d = daemon(config_text=config_text(MODES, supervisor={"default_mode": "diag"}))
    payload = msgpack.packb([[]] * 3_800_000)
    answer, grown = _echo_growing(d, "big", payload)
    assert not answer["ok"] and answer["error"]["code"] == "protocol_error", answer
    assert "exceeds max_array_len" in answer["error"]["message"], answer
    assert grown < 64 * 1024 * 1024, (
        f"the daemon grew by {grown / 2**20:.0f} MiB for a {len(payload) / 2**20:.1f} MiB payload"
    )


def _with_raw_payload(fields: dict, payload: bytes) -> bytes:
    """A request map whose ``payload`` is ``payload``, already msgpack."""
    packer = msgpack.Packer(use_bin_type=True)
    return b"".join([packer.pack_map_header(len(fields) + 1), *(packer.pack(k) + packer.pack(v) for k, v in fields.items()),
                     packer.pack("payload"), payload])  # fmt: skip


@pytest.mark.daemon
def test_a_field_that_should_be_plain_but_holds_a_container_is_refused_without_building_it(daemon):
    d = daemon(config_text=config_text(MODES))
    raw = RawClient(d.endpoint, timeout=T)
    try:
        raw._sock.send(_with_raw_payload({"v": 1, "k": "submit", "id": 7, "task": [[]] * 1000}, msgpack.packb(1)))
        answer = raw.wait_for(7)
        assert not answer["ok"] and answer["error"]["code"] == "protocol_error"
        assert "submit.task is an array or map, expected str" in answer["error"]["message"]
    finally:
        raw.close()


# ---------------------------------------------------------------- operators apart from callers

OTHER_USER = 65534  # nobody, in the group nogroup


def _as_another_user(endpoint: str, code: str) -> subprocess.CompletedProcess:
    """``code`` in a client process that drops to uid/gid 65534 before it
    connects: the kernel then tells the daemon that uid (SO_PEERCRED)."""
    script = textwrap.dedent(f"""
        import os, sys
        from supervisor.client import Client
        from supervisor import Forbidden
        os.setgroups([]); os.setgid({OTHER_USER}); os.setuid({OTHER_USER})
        ENDPOINT = {endpoint!r}
        c = Client(ENDPOINT, timeout=30)
    """) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=T,
                          env={**os.environ, "PYTHONPATH": repo_pythonpath()})  # fmt: skip


@pytest.fixture
def shared_daemon(daemon):
    """A daemon whose socket the group nogroup may reach (socket_group), in
    a folder another user may pass through."""

    def start(supervisor: dict | None = None, **settings) -> object:
        folder = tempfile.mkdtemp(prefix="gv-shared-")
        os.chmod(folder, 0o711)
        text = config_text(MODES, supervisor={"default_mode": "diag", **(supervisor or {})},
                           daemon={"socket_group": "nogroup", **settings})  # fmt: skip
        d = daemon(config_text=text, endpoint=f"ipc://{folder}/run/g.sock")
        with d.client() as c:
            wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
        return d

    return start


@pytest.mark.daemon
@pytest.mark.skipif(os.getuid() != 0, reason="changing to another uid needs root")
def test_a_caller_of_another_user_may_run_jobs_but_not_stop_switch_restart_unload_or_reload(shared_daemon):
    d = shared_daemon()
    out = _as_another_user(
        d.endpoint,
        """
        print(c.submit("echo", "a job").result(30))
        for call in (lambda: c.shutdown(drain=False), lambda: c.switch_mode("other").result(30),
                     lambda: c.restart().result(30), lambda: c.unload().result(30), c.reload):
            try:
                call()
                print("allowed")
            except Forbidden as e:
                print("forbidden:", e)
    """,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "a job"
    assert len(lines) == 6 and all(line.startswith("forbidden: ") for line in lines[1:]), out.stdout
    assert "admin_group" in lines[1]
    assert d.running(), "the daemon still serves"
    with d.client() as c:
        assert c.status()["mode"] == "diag" and c.status()["generation"] == 1, "nothing was switched or restarted"
    assert "refused shutdown from uid 65534 (nobody)" in d.output()


@pytest.mark.daemon
@pytest.mark.skipif(os.getuid() != 0, reason="changing to another uid needs root")
def test_a_member_of_admin_group_is_an_operator(shared_daemon):
    d = shared_daemon(admin_group="nogroup")
    out = _as_another_user(
        d.endpoint,
        """
        print(c.switch_mode("other").result(30)["status"])
        c.shutdown(drain=True)
    """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["loaded"]
    assert d.wait() == 0


@pytest.mark.daemon
def test_an_unknown_admin_group_stops_the_daemon_before_it_starts(daemon):
    d = daemon(config_text=config_text(MODES, daemon={"admin_group": "no-such-group-here"}), wait_ready=False)
    assert d.wait() == 6
    assert "admin_group 'no-such-group-here' is not a group" in d.output()


@pytest.mark.daemon
def test_only_admin_curve_keys_may_stop_the_daemon(daemon, tmp_path):
    from zmq.auth import create_certificates

    from supervisor.client import Client
    from tests.helpers.daemon import free_port

    for folder in ("server", "clients", "admins", "secrets"):
        (tmp_path / folder).mkdir()
    server_public, server_secret = create_certificates(tmp_path / "server", "server")
    client_public, client_secret = create_certificates(tmp_path / "secrets", "client")
    admin_public, admin_secret = create_certificates(tmp_path / "secrets", "admin")
    os.rename(client_public, tmp_path / "clients" / "client.key")
    os.rename(admin_public, tmp_path / "admins" / "admin.key")  # only there: an admin may connect too
    from zmq.auth import load_certificate

    server_key, _ = load_certificate(server_public)
    port = free_port()
    d = daemon(config_text=config_text(MODES, daemon={"curve_secret_key": str(server_secret),
                                                      "curve_clients_dir": str(tmp_path / "clients"),
                                                      "curve_admins_dir": str(tmp_path / "admins")}),
               endpoint=f"tcp://127.0.0.1:{port}")  # fmt: skip
    endpoint = f"tcp://127.0.0.1:{port}"
    with Client(endpoint, curve_server_key=server_key, curve_client_cert=client_secret) as c:
        assert c.submit("echo", 1, mode="diag").result(T) == 1
        with pytest.raises(Forbidden):
            c.shutdown()
        with pytest.raises(Forbidden):
            c.switch_mode("other").result(T)
    with Client(endpoint, curve_server_key=server_key, curve_client_cert=admin_secret) as admin:
        assert admin.switch_mode("other").result(T)["status"] == "loaded"
        admin.shutdown()
    assert d.wait() == 0


# ---------------------------------------------------------------- the operator's limits are ceilings


@pytest.mark.daemon
def test_a_clients_timeout_cannot_run_a_job_past_the_operators_job_timeout(daemon):
    """On main a client's timeout=0 ran an 8 s job past job_timeout = 2."""
    d = daemon(config_text=config_text(MODES, supervisor={"job_timeout": 1.0, "default_mode": "diag"}))
    with d.client() as c:
        for asked in (0, 30):
            with pytest.raises(JobTimeout, match="ran past its 1s timeout"):
                c.submit("sleep", {"seconds": 8}, timeout=asked).result(T)
        assert c.submit("sleep", {"seconds": 0.1}, timeout=0.5).result(T) == {"slept": 0.1}, "less is allowed"


# ---------------------------------------------------------------- metrics labels


@pytest.mark.daemon
def test_made_up_task_names_add_no_metric_series(daemon):
    """On main 500 random task names added 12,000 series to /metrics."""
    d = daemon(config_text=config_text(MODES, supervisor={"default_mode": "diag"}))
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
        assert c.submit("echo", 1).result(T) == 1
        futures = [c.submit(f"made-up-{uuid.uuid4().hex}") for _ in range(500)]
        for f in futures:
            with pytest.raises(UnknownTask):
                f.result(T)
        families = list(text_string_to_metric_families(c.metrics()))
    jobs = next(f for f in families if f.name == "gpuvisor_jobs")
    tasks = {s.labels["task"] for s in jobs.samples}
    assert tasks == {"echo", "other"}, tasks
    series = sum(len(f.samples) for f in families)
    assert series < 400, f"{series} series"


@pytest.mark.daemon
def test_a_payload_the_worker_cannot_read_fails_its_job_under_its_id(daemon):
    d = daemon(config_text=config_text(MODES, supervisor={"default_mode": "diag"}))
    raw = RawClient(d.endpoint, timeout=T)
    try:
        raw._sock.send(_with_raw_payload({"v": 1, "k": "submit", "id": "ext", "task": "echo"},
                                         msgpack.packb(msgpack.ExtType(42, b"zz"))))  # fmt: skip
        answer = raw.wait_for("ext")
        assert not answer["ok"] and answer["error"]["code"] in ("job_failed", "protocol_error"), answer
        assert "ext type 42" in answer["error"]["message"]
    finally:
        raw.close()


# ---------------------------------------------------------------- a typo never costs the loaded mode


@pytest.mark.daemon
def test_a_switch_to_a_mode_whose_module_cannot_be_imported_leaves_the_serving_worker_alone(daemon):
    """On main, a switch to such a mode first killed the mode that served
    (``mode: -`` afterwards). Now it is refused before anything is stopped."""
    d = daemon(config_text=config_text({"diag": DIAG, "typo": "worker.modes.daig:load"},
                                       supervisor={"default_mode": "diag"}))  # fmt: skip
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
        pid = c.submit("pid").result(T)
        with pytest.raises(ModeLoadError, match="cannot import 'worker.modes.daig': no such module"):
            c.switch_mode("typo").result(T)
        status = c.status()
        assert status["mode"] == "diag" and status["worker_pid"] == pid, status
        assert c.submit("pid").result(T) == pid


@pytest.mark.daemon
def test_a_clients_short_timeout_gives_up_without_killing_the_worker_or_breaking_the_mode(daemon):
    """A client's timeout under the operator's (none here) killed the worker
    on main: four jobs with timeout=0.001 forced four reloads and broke the
    mode for everyone. Now the client gets JobTimeout and the worker
    finishes the job: same worker, no restart, nothing broken."""
    d = daemon(config_text=config_text(MODES, supervisor={"default_mode": "diag", "max_restarts": 0}))
    with d.client() as c:
        wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
        pid = c.submit("pid").result(T)
        for _ in range(4):
            with pytest.raises(JobTimeout, match="given up .*only the operator's job_timeout stops a worker"):
                c.submit("sleep", {"seconds": 0.3}, timeout=0.001).result(T)
        assert c.submit("pid").result(T) == pid, "the same worker serves"
        status = c.status()
        assert status["restarts"] == 0 and status["broken_modes"] == {}, status
    assert "given up; the worker finishes it" in d.output()


# ---------------------------------------------------------------- connections to the ZeroMQ socket


@pytest.mark.daemon
@pytest.mark.skipif(os.getuid() != 0, reason="changing to another uid needs root")
def test_a_user_who_opens_many_zeromq_connections_holds_only_a_few_and_the_daemon_serves_on(shared_daemon):
    """libzmq bounds nothing, and aborts the daemon when its descriptors run
    out: a socket_group member's few thousand connections stopped the
    service on main. Now each user other than the daemon's own and root
    holds at most max_connections_per_user; the rest are closed at once."""
    d = shared_daemon(max_connections_per_user=8)
    out = _as_another_user(
        d.endpoint,
        """
        import zmq, time
        c.ping()  # connected first: the flood that follows is past the cap, this one is not
        ctx = zmq.Context()
        socks = []
        for _ in range(200):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ENDPOINT)
            socks.append(s)
        time.sleep(2)
        print(c.submit("echo", "still served").result(30))
        for s in socks:
            s.close()
        ctx.term()
    """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["still", "served"]
    with d.client() as c:
        clients = c.status()["clients"]
        assert clients["refused_connections"] > 0, clients
        assert c.submit("echo", "the operator too").result(T) == "the operator too"
    assert "past max_connections_per_user (8)" in d.output()
    assert d.running()


@pytest.mark.daemon
def test_a_daemon_started_with_a_low_soft_limit_on_files_raises_it_and_survives_a_burst_of_connections(
    daemon, tmp_path
):
    """At a soft limit of 400 open files, 450 connections made libzmq abort
    the daemon (an assertion on EMFILE in its ipc listener). The daemon now
    raises its soft limit to the hard one at start."""
    import sys

    import zmq

    config = tmp_path / "g.toml"
    config.write_text(config_text(MODES))
    endpoint = f"ipc://{tmp_path}/run/g.sock"
    command = f"ulimit -Sn 400 && exec {sys.executable} -m supervisor.service.cli --endpoint {endpoint} " \
              f"--config {config} serve"  # fmt: skip
    d = daemon(argv=["sh", "-c", command], endpoint=endpoint)
    ctx = zmq.Context()
    socks = []
    try:
        for _ in range(450):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            socks.append(s)

        def answers() -> bool:  # the burst fills the listen backlog a moment: a probe may be refused meanwhile
            try:
                with d.client(timeout=2) as c:
                    return c.submit("echo", "served", mode="diag").result(T) == "served"
            except DaemonUnavailable:
                assert d.running(), d.output()[-2000:]
                return False

        wait_until(answers, T, "the daemon to answer through the burst")
        assert d.running()
    finally:
        for s in socks:
            s.close()
        ctx.term()


@pytest.mark.daemon
@pytest.mark.skipif(os.getuid() != 0, reason="changing to another uid needs root")
def test_many_connections_of_one_user_share_one_share_of_the_queue(shared_daemon):
    """With a share per connection, four connections of one process held
    four shares and filled the queue (adversarial review). A user other
    than the daemon's own and root has one share (here 10 of max_queue 40),
    however many connections it opens."""
    d = shared_daemon(supervisor={"max_queue": 40})
    out = _as_another_user(
        d.endpoint,
        """
        from supervisor import QueueFull
        clients = [c, *(Client(ENDPOINT, timeout=30) for _ in range(3))]
        futures = [clients[0].submit("sleep", {"seconds": 2})]
        import time
        while c.status()["in_flight"] < 1:  # the blocker runs: the echoes wait behind it
            time.sleep(0.01)
        futures += [clients[n % 4].submit("echo", n) for n in range(19)]
        outcomes = []
        for f in futures:
            try:
                f.result(30)
                outcomes.append("ok")
            except QueueFull:
                outcomes.append("full")
        print(outcomes.count("ok"), outcomes.count("full"))
    """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["10", "10"], out.stdout


@pytest.mark.daemon
def test_an_answer_that_decodes_to_far_more_than_it_weighs_is_not_built_in_the_daemon(daemon):
    """An echo of 4 MB of empty arrays: the worker builds it (its own job),
    but the daemon forwards the answer as the bytes the worker sent. On
    main it decoded the answer to send it again: +600 MB and the others'
    jobs waited behind it (adversarial review)."""
    d = daemon(config_text=config_text(MODES, supervisor={"default_mode": "diag"}))
    answer, grown = _echo_growing(d, "nested", msgpack.packb([[[]] * 1_000_000] * 4))
    assert answer["ok"] and len(answer["value"]) == 4 and len(answer["value"][0]) == 1_000_000
    assert grown < 64 * 1024 * 1024, f"the daemon grew by {grown / 2**20:.0f} MiB"
