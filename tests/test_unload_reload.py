"""An operator's ``unload`` and ``reload``, through the daemon and the
``gpuvisor`` command: unload frees the device once its jobs are done and
the next job loads the mode again; reload says what changed, what waits for
a restart, and why a broken file was refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import DIAG, config_text

pytestmark = pytest.mark.daemon

MODES = {"diag": DIAG, "diag2": DIAG}


def gpuvisor(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpuvisor", "--endpoint", d.endpoint, *args], capture_output=True,
                          text=True, timeout=T)  # fmt: skip


def test_unload_waits_for_the_job_in_flight_then_frees_the_device_until_the_next_job(daemon):
    d = daemon(config_text=config_text(MODES))
    with d.client() as c:
        c.switch_mode("diag").result(T)
        pid = c.submit("pid").result(T)
        running = c.submit("sleep", {"seconds": 1.0})
        wait_until(lambda: c.status()["in_flight"] == 1, T, "the sleep to run")
        unload = c.unload()
        assert running.result(T) == {"slept": 1.0}, "the job in flight finished first"
        assert unload.result(T) == {"unloaded": [{"device": "cpu", "mode": "diag", "pid": pid}]}
        wait_until(lambda: pid_gone(pid), T, "the worker to be reaped")
        status = c.status()
        assert status["idle_unloaded"] == "diag" and status["worker_pid"] is None and status["restarts"] == 0
        assert c.unload().result(T) == {"unloaded": []}, "nothing left to unload"
        fresh = c.submit("pid").result(T)  # no mode named: the mode in force loads again
        assert fresh != pid and c.status()["idle_unloaded"] is None
    out = gpuvisor(d, "--json", "unload")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["value"] == {"unloaded": [{"device": "cpu", "mode": "diag", "pid": fresh}]}
    with d.client() as c:
        c.submit("echo", 1).result(T)
        busy = c.submit("sleep", {"seconds": 1.0})
        wait_until(lambda: c.status()["in_flight"] == 1, T, "the sleep to run")
        piped = gpuvisor(d, "unload")  # stderr is a pipe: one plain line per step
        assert busy.result(T) == {"slept": 1.0}
    assert piped.returncode == 0, piped.stderr
    steps = piped.stderr.splitlines()
    assert "1 job(s) in flight on cpu finish first" in steps[0] and "ended: unloaded by an operator" in steps[-1], steps
    bad = gpuvisor(d, "unload", "--device", "cuda:7")
    assert bad.returncode == 1 and "unknown device 'cuda:7'" in bad.stderr
    assert "unloading mode 'diag' on cpu" in d.output()


def test_reload_reports_what_changed_and_keeps_the_running_file_when_it_is_broken(daemon):
    text = config_text(MODES, supervisor={"max_queue": 100})
    d = daemon(config_text=text)
    with d.client() as c:
        c.switch_mode("diag").result(T)
    # One mode more, one less, one changed while loaded, a setting that applies now and one that waits.
    changed = config_text({"diag": {"loader": DIAG, "args": {"test_hooks": False}}, "extra": DIAG},
                          supervisor={"max_queue": 200, "max_wait_s": 1.5})  # fmt: skip
    with open(d.config, "w") as f:
        f.write(changed + '\n[http.models.echo]\nmode = "diag"\ncompletions = "echo"\n')
    out = gpuvisor(d, "--json", "reload")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["value"]
    assert report["reloaded"] is True and report["error"] is None and report["file"] == d.config
    assert (report["added"], report["removed"], report["changed"]) == (["extra"], ["diag2"], ["diag"])
    assert set(report["settings"]) == {"max_queue", "max_wait_s", "http"}
    assert any("[http] applies when the daemon restarts" in n for n in report["notes"])
    assert any("max_queue keeps its value" in n for n in report["notes"])
    assert any("mode 'diag' is loaded with its old entry" in n for n in report["notes"])
    human = gpuvisor(d, "reload")  # nothing changed since: the same file again
    assert human.returncode == 0 and human.stdout.strip() == f"reloaded {d.config}: nothing changed"
    with open(d.config, "a") as f:
        f.write("\n[modes.extra2\n")
    refused = gpuvisor(d, "reload")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    assert "kept the running configuration" in refused.stderr and d.config in refused.stderr
    with d.client() as c:
        assert "extra" in c.status()["modes"], "the last good file is still in force"
        assert c.switch_mode("extra").result(T)["status"] == "loaded"
    assert "reload from" in d.output() and "keeping the running configuration" in d.output()
