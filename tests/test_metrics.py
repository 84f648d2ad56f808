"""Prometheus metrics: counted as work happens on a real supervisor and read
back with ``prometheus_client``'s own parser, through every door an
operator scrapes: ``Supervisor.metrics()``, the daemon's ``metrics``
request (``Client``, ``AsyncClient``, ``gpuvisor metrics``) and ``GET
/metrics`` over the HTTP listener with curl."""

from __future__ import annotations

import asyncio
import subprocess
from concurrent.futures import CancelledError

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol import JobFailed, JobTimeout, WorkerCrashed
from supervisor import Supervisor
from supervisor.client import AsyncClient
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import GPUVISOR, RunningDaemon
from tests.test_http import curl, http_config, http_socket


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by its name and labels; the text
    must parse as Prometheus's own parser reads it."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: dict, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


@pytest.mark.process
def test_jobs_are_counted_once_each_by_mode_task_and_outcome(supervisor_from):
    sup: Supervisor = supervisor_from(config_text(supervisor={"default_mode": "diag"}))
    sup.switch_mode("diag").result(T)
    for i in range(5):
        sup.submit("echo", i).result(T)
    with pytest.raises(JobFailed):
        sup.submit("fail", None).result(T)
    with pytest.raises(JobTimeout):
        sup.submit("sleep", {"seconds": 30}, timeout=0.3).result(T)
    with pytest.raises(WorkerCrashed):
        sup.submit("crash", None).result(T)
    blocker = sup.submit("sleep", {"seconds": 0.5})
    queued = sup.submit("echo", "never runs")
    assert queued.cancel()
    blocker.result(T)
    got = samples(sup.metrics())
    ran = {("echo", "ok"): 5, ("fail", "job_failed"): 1, ("sleep", "job_timeout"): 1, ("crash", "worker_crashed"): 1,
           ("sleep", "ok"): 1}  # fmt: skip
    for (task, outcome), n in ran.items():
        assert value(got, "gpuvisor_jobs_total", mode="diag", task=task, outcome=outcome) == n, (task, outcome)
    # The cancelled job never reached a worker: it is counted under the mode it named (none).
    assert value(got, "gpuvisor_jobs_total", mode="", task="echo", outcome="cancelled") == 1
    assert total(got, "gpuvisor_jobs_total") == 10, "every job once, none twice"
    assert total(got, "gpuvisor_job_duration_seconds_count") == 10
    # Every job that reached a worker waited in the queue first (the crashed one once).
    assert value(got, "gpuvisor_queue_wait_seconds_count", mode="diag") == 9
    # A crash and a timeout each cost a worker: restarts and generations follow the status.
    status = sup.status()
    assert value(got, "gpuvisor_worker_restarts_total", device="cpu") == status["restarts"] >= 1
    assert value(got, "gpuvisor_worker_generations_total") == status["generation"] >= 3


@pytest.mark.process
def test_switches_their_phases_batches_and_the_state_the_status_owns(supervisor_from):
    sup: Supervisor = supervisor_from(config_text({"diag": DIAG, "other": DIAG, "broken": {"loader": DIAG,
                                                  "args": {"x": 1}}}, supervisor={"warm_standby": False}))  # fmt: skip
    sup.switch_mode("diag").result(T)
    sup.switch_mode("other").result(T)
    sup.switch_mode("other").result(T)  # a no-op: not a switch
    with pytest.raises(Exception, match="takes no arguments"):
        sup.switch_mode("broken").result(T)
    sup.switch_mode("diag").result(T)
    # Eight batch_echo jobs queued while the worker sleeps go as batches.
    blocker = sup.submit("sleep", {"seconds": 0.5})
    jobs = [sup.submit("batch_echo", i) for i in range(8)]
    sizes = [j.result(T)["batch"] for j in jobs]
    blocker.result(T)
    got = samples(sup.metrics())
    assert value(got, "gpuvisor_switches_total", mode="diag", outcome="loaded") == 2
    assert value(got, "gpuvisor_switches_total", mode="other", outcome="loaded") == 1
    assert value(got, "gpuvisor_switches_total", mode="broken", outcome="failed") == 1
    for phase in ("total", "spawn", "load"):
        assert value(got, "gpuvisor_switch_duration_seconds_count", phase=phase) == 3, phase
    assert value(got, "gpuvisor_switch_duration_seconds_count", phase="warmup") == 0  # no mode here has a warm-up
    assert (
        value(got, "gpuvisor_switch_duration_seconds_count", phase="stop") == 1
    )  # diag -> other; the others found no worker to stop
    # Each call of the batch handler is one observation of its size.
    calls = round(sum(1 / size for size in sizes))  # a batch of n answers n jobs
    assert value(got, "gpuvisor_batch_size_count", mode="diag", task="batch_echo") == calls
    assert value(got, "gpuvisor_batch_size_sum", mode="diag", task="batch_echo") == 8
    assert max(sizes) > 1, "the jobs queued behind the sleep went as a batch"
    # State, read from the status at scrape time.
    status = sup.status()
    assert value(got, "gpuvisor_state", state="running") == 1 and value(got, "gpuvisor_state", state="failed") == 0
    assert value(got, "gpuvisor_mode_loaded", device="cpu", mode="diag") == 1
    assert value(got, "gpuvisor_worker_rss_bytes", device="cpu") == status["worker_rss_bytes"] > 0


@pytest.mark.process
def test_queue_depth_and_age_per_mode_while_jobs_wait(supervisor_from):
    sup: Supervisor = supervisor_from(config_text({"diag": DIAG, "other": DIAG}))
    sup.switch_mode("diag").result(T)
    blocker = sup.submit("sleep", {"seconds": 30}, timeout=0)
    wait_until(lambda: sup.status()["worker_state"] == "busy", T, "the sleep to run")
    waiting = [sup.submit("echo", i, mode="other") for i in range(3)] + [sup.submit("echo", "d", mode="diag")]
    wait_until(lambda: sup.status()["queued"] == 4, T, "the jobs to be queued")
    got = samples(sup.metrics())
    assert value(got, "gpuvisor_queue_depth", mode="other") == 3
    assert value(got, "gpuvisor_queue_depth", mode="diag") == 1
    assert value(got, "gpuvisor_queue_oldest_seconds", mode="other") >= 0
    assert value(got, "gpuvisor_queued") == 4 and value(got, "gpuvisor_in_flight", device="cpu") == 1
    assert blocker.cancel() is False  # running: it cannot be; stop everything instead
    sup.shutdown(drain=False)
    for job in [blocker, *waiting]:
        with pytest.raises((CancelledError, Exception)):
            job.result(T)


@pytest.mark.daemon
@pytest.mark.slow
def test_every_door_of_the_daemon_serves_the_same_metrics(tmp_path):
    """``gpuvisor metrics`` (the console script), ``Client.metrics()``,
    ``AsyncClient.metrics()`` and ``GET /metrics`` over the HTTP unix socket
    each read the daemon's own figures, moving with the work it does."""
    text = http_config({"diag": DIAG}, {"diag-echo": {"mode": "diag", "completions": "echo"}},
                       supervisor={"default_mode": "diag", "warm_standby": False})  # fmt: skip
    d = RunningDaemon(config_text=text)
    try:
        with d.client() as c:
            wait_until(lambda: c.status()["mode"] == "diag", T, "diag to load")
            for i in range(3):
                c.submit("echo", i).result(T)
            by_client = samples(c.metrics())
        assert value(by_client, "gpuvisor_jobs_total", mode="diag", task="echo", outcome="ok") == 3
        done = subprocess.run([GPUVISOR, "--endpoint", d.endpoint, "metrics"], capture_output=True, text=True,
                              timeout=T)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert value(samples(done.stdout), "gpuvisor_jobs_total", mode="diag", task="echo", outcome="ok") == 3
        status, body = curl("http://gpuvisor/v1/completions", {"model": "diag-echo", "prompt": "hi"},
                            unix=http_socket(d))  # fmt: skip
        # diag's echo answers its payload back, not a completion: the door says so (502), and the job,
        # which ran and answered, counts as any other.
        assert status == 502 and body["error"]["code"] == "bad_task_result", body
        status, body = curl("http://gpuvisor/metrics", unix=http_socket(d))
        assert status == 200
        scraped = samples(body)
        assert value(scraped, "gpuvisor_jobs_total", mode="diag", task="echo", outcome="ok") == 4
        assert value(scraped, "gpuvisor_switches_total", mode="diag", outcome="loaded") == 1

        async def through_asyncio() -> str:
            async with AsyncClient(d.endpoint) as client:
                return await client.metrics()

        assert value(samples(asyncio.run(through_asyncio())), "gpuvisor_mode_loaded", device="cpu", mode="diag") == 1
    finally:
        d.close()
