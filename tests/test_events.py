"""Progress on every long wait: the daemon streams its events (switch
phases, workers, drains) to whoever follows, and the CLI shows them on
stderr while stdout keeps the result. A real daemon through the console
script, the diag mode, and a mode whose loader sleeps (a slow load)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from concurrent.futures import Future

import psutil
import pytest

from supervisor import Supervisor
from supervisor.client import AsyncClient
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import GPUVISOR, RunningDaemon, serving
from tests.helpers.raw_client import RawClient

SLOW_LOAD_S = 2.5
CONFIG = config_text(
    {"diag": DIAG, "slow": {"loader": "tests.helpers.loaders:slow", "args": {"seconds": SLOW_LOAD_S}}},
    supervisor={"warm_standby": False, "default_mode": "diag"},
)


@pytest.fixture(autouse=True)
def no_leftover_children():
    """conftest's check, on this module's own processes: the shared daemon's
    workers come and go with its switches and are the daemon's to reap (the
    session's own check finds them all gone at the end)."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    yield
    wait_until(lambda: not [p for p in me.children() if p.pid not in before], 10.0, "the test's processes to end")


@pytest.fixture(scope="module")
def daemon():
    with serving(CONFIG, mode="diag") as d:
        yield d


def gpuvisor(d: RunningDaemon, *args: str) -> subprocess.CompletedProcess:
    """The console script, to the end, stderr a pipe (not a terminal)."""
    return subprocess.run([GPUVISOR, "--endpoint", d.endpoint, *args], capture_output=True, text=True, timeout=T,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def to_mode(d: RunningDaemon, mode: str) -> None:
    with d.client() as c:
        c.switch_mode(mode).result(T)


@pytest.mark.daemon
def test_events_json_follows_a_switch_phase_by_phase(daemon):
    to_mode(daemon, "diag")
    follower = subprocess.Popen([GPUVISOR, "--endpoint", daemon.endpoint, "events", "--json"], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        first = json.loads(follower.stdout.readline())  # subscribed: where things stand
        assert first["event"] == "following" and first["devices"][0]["mode"] == "diag", first
        with daemon.client() as c:
            result = c.switch_mode("slow").result(T)
        seen = []
        while not seen or seen[-1].get("phase") not in ("ready", "failed"):
            line = follower.stdout.readline()
            assert line, follower.stderr.read()
            event = json.loads(line)
            assert isinstance(event["t"], float)
            seen.append(event)
        phases = [e["phase"] for e in seen if e["event"] == "switch"]
        assert phases == ["stop", "spawn", "load", "ready"], seen  # no reclaim without a GPU
        ready = seen[-1]
        assert ready["mode"] == "slow" and ready["previous"] == "diag" and ready["pid"] == result["pid"]
        assert ready["load_seconds"] >= SLOW_LOAD_S and ready["device"] == "cpu"
        ended = next(e for e in seen if e["event"] == "worker_ended")
        assert ended["mode"] == "diag" and ended["expected"] is True and "switching to mode 'slow'" in ended["why"]
        started = next(e for e in seen if e["event"] == "worker_started")
        assert started["pid"] == result["pid"] and started["mode"] == "slow"
        follower.send_signal(signal.SIGINT)  # following ends at Ctrl-C, and that is success
        assert follower.wait(T) == 0
    finally:
        follower.kill()
        follower.wait(T)
        follower.stdout.close()
        follower.stderr.close()
    log = daemon.output()  # the log tells the same phases, with their times
    assert "switching cpu from mode 'diag' to 'slow': stopping worker pid" in log
    assert "loading mode 'slow'" in log and "mode 'slow' ready in" in log and "spawn" in log


@pytest.mark.daemon
def test_switch_in_a_pipe_prints_a_line_per_phase_on_stderr(daemon):
    to_mode(daemon, "slow")
    out = gpuvisor(daemon, "switch", "diag")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["stopping", "starting", "loading", "ready"], lines
    assert all(line.startswith("switch to mode 'diag' on cpu: ") for line in lines), lines
    assert "mode:" in out.stdout and "status:" in out.stdout and "loaded" in out.stdout  # the result, as before
    again = gpuvisor(daemon, "--json", "restart")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["value"]["status"] == "restarted"  # stdout stays machine-readable
    assert "restart to mode 'diag' on cpu: ready in" in again.stderr


@pytest.mark.daemon
def test_a_submit_behind_a_slow_switch_says_what_it_waits_for(daemon):
    to_mode(daemon, "diag")
    with daemon.client() as c:
        switching = c.switch_mode("slow")
        out = gpuvisor(daemon, "submit", "echo", "7", "--mode", "slow")
        switching.result(T)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
    said = out.stderr.splitlines()
    assert said and said[0].startswith("waiting: mode 'slow' is loading on cpu"), said
    assert said[-1].startswith("switch to mode 'slow' on cpu: ready in"), said
    quick = gpuvisor(daemon, "submit", "echo", "8")  # a job that does not wait says nothing
    assert quick.returncode == 0 and quick.stdout.strip() == "8" and quick.stderr == ""


@pytest.mark.daemon
def test_a_follower_that_never_reads_does_not_stall_anyone_and_is_let_go(daemon):
    to_mode(daemon, "diag")
    deaf = RawClient(daemon.endpoint)
    deaf.send("events", buffer=2)  # never read: its events wait in a queue of 2, the oldest dropped
    with daemon.client() as c:
        wait_until(lambda: c.status()["clients"]["following_events"] >= 1, T, "the deaf follower to be served")
        for _ in range(3):
            assert c.restart("diag").result(T)["status"] == "restarted"
        assert [c.submit("echo", n).result(T) for n in range(20)] == list(range(20))
        deaf.close()  # its connection goes: it stops being followed at its next event
        c.restart("diag").result(T)
        wait_until(lambda: c.status()["clients"]["following_events"] == 0, T, "the gone follower to be let go")


@pytest.mark.daemon
def test_the_async_client_follows_too(daemon):
    async def first_two():
        client = AsyncClient(daemon.endpoint)
        try:
            async with client.events() as events:
                got = []
                async for event in events:
                    got.append(event)
                    if len(got) == 1:
                        await client.restart("diag")
                    if event.get("phase") == "ready":
                        return got
        finally:
            await client.close()

    got = asyncio.run(asyncio.wait_for(first_two(), T))
    assert got[0]["event"] == "following" and got[-1]["why"] == "restart"


@pytest.mark.daemon
def test_stop_reports_the_drain_and_what_it_cancelled():
    d = RunningDaemon(config_text=config_text(supervisor={"default_mode": "diag"}))
    try:
        with d.client() as c:
            wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
            jobs: list[Future] = [c.submit("sleep", {"seconds": s}) for s in (0.5, 30, 30)]
            wait_until(lambda: c.status()["in_flight"] == 1, T, "the first job to run")
            out = gpuvisor(d, "stop", "--drain-timeout", "2")
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "stopped: 1 job finished, 2 cancelled", out
            assert out.stderr.splitlines()[0].startswith("draining: 3 jobs left"), out.stderr
            assert "draining: 2 jobs left" in out.stderr
            assert jobs[0].result(T) == {"slept": 0.5} or jobs[0].exception(T) is None
        assert d.wait() == 0
        log = d.output()
        assert "draining: jobs left 2" in log and "stopped: jobs finished 1, cancelled 2" in log
    finally:
        d.close()


@pytest.mark.process
def test_with_nobody_following_the_engine_builds_no_events(write_config):
    sup = Supervisor(write_config(config_text()), mode="diag").start()
    try:
        sup.restart().result(T)
        assert sup._engine.told == 0  # nobody follows: not one event was built
        events = sup.events(buffer=2)
        for _ in range(2):
            sup.restart().result(T)
        got = events.take()
        assert sup._engine.told > 2
        assert got[0]["event"] == "dropped" and got[0]["count"] >= 1, got  # the oldest went, and it is said
        assert len(got) == 3 and got[-1]["phase"] == "ready", got
        events.close()
        sup.restart().result(T)
        deadline = time.monotonic() + T
        while sup._engine.followers and time.monotonic() < deadline:  # forgotten at the next event
            sup.restart().result(T)
        assert not sup._engine.followers
    finally:
        sup.shutdown(drain=False)
    assert events.next(timeout=0) is None and events.over
