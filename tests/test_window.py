"""``window``: jobs handed to the worker ahead of the one running, so the
worker never idles for a round trip. They count as running (``cancel()``
says False); if the worker dies they go to the next worker untouched, since
it runs jobs in order and had not started them."""

from __future__ import annotations

import pytest

from supervisor import JobTimeout, WorkerCrashed
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, config_text

pytestmark = pytest.mark.process


def test_a_full_window_is_in_flight_and_the_rest_queued(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"window": 4}))
    sup.switch_mode("diag").result(T)
    first = sup.submit("sleep", {"seconds": 0.5})
    rest = [sup.submit("echo", i) for i in range(9)]
    wait_until(lambda: (sup.status()["in_flight"], sup.status()["queued"]) == (4, 6), T, "4 in flight, 6 queued")
    assert [f.cancel() for f in rest[:3]] == [False] * 3 and rest[3].cancel() is True
    assert first.result(T) == {"slept": 0.5} and [f.result(T) for f in rest[4:]] == list(range(4, 9))


def test_jobs_sent_ahead_of_a_crash_run_on_the_next_worker_without_using_retries(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"window": 8}))
    old = sup.submit("pid", mode="diag").result(T)
    victim = sup.submit("crash", {"how": "kill"})
    behind = [sup.submit("pid") for _ in range(6)]  # in the worker's socket when it dies
    with pytest.raises(WorkerCrashed):
        victim.result(T)
    pids = [f.result(T) for f in behind]
    assert len(set(pids)) == 1 and pids[0] != old  # all ran, once, on the new worker
    assert sup.status()["restarts"] == 1


def test_only_the_running_job_times_out_and_the_clock_starts_when_a_job_reaches_the_head(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"window": 8}))
    sup.switch_mode("diag").result(T)
    # Each sleeps 0.4 s with a 1 s limit: together 2 s, but each alone is in time.
    slow = [sup.submit("sleep", {"seconds": 0.4}, timeout=1.0) for _ in range(5)]
    assert [f.result(T) for f in slow] == [{"slept": 0.4}] * 5
    stuck = sup.submit("sleep", {"seconds": 30}, timeout=0.5)
    after = sup.submit("echo", "after")
    with pytest.raises(JobTimeout):
        stuck.result(T)
    assert after.result(T) == "after"


def test_window_one_sends_one_job_at_a_time(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"window": 1}))
    sup.switch_mode("diag").result(T)
    running = sup.submit("sleep", {"seconds": 0.3})
    nxt = sup.submit("echo", 1)
    wait_until(lambda: sup.status()["in_flight"] == 1 and sup.status()["queued"] == 1, T, "one running, one queued")
    assert nxt.cancel() is True and running.result(T) == {"slept": 0.3}


def test_a_switch_waits_for_the_whole_window(supervisor_from):
    sup = supervisor_from(config_text({"diag": DIAG, "other": DIAG}, supervisor={"window": 8}))
    pid = sup.submit("pid", mode="diag").result(T)
    before = [sup.submit("sleep", {"seconds": 0.05}) for _ in range(5)]
    switched = sup.switch_mode("other")
    after = sup.submit("pid")
    assert all(f.result(T) == {"slept": 0.05} for f in before)
    assert switched.result(T)["previous"] == "diag" and after.result(T) != pid


def test_with_the_default_window_a_finished_job_keeps_its_result_when_the_next_one_kills_the_worker(supervisor_from):
    """Why the default is 1: the next job is sent only once the result is in,
    so a poison job right behind a good one cannot take its result along."""
    sup = supervisor_from(config_text(supervisor={"max_restarts": 100, "restart_backoff": 0}))
    assert sup.status()["window"] == 1
    sup.switch_mode("diag").result(T)
    for i in range(10):
        good = sup.submit("echo", i)
        poison = sup.submit("crash", {"how": "kill"})
        assert good.result(T) == i
        with pytest.raises(WorkerCrashed):
            poison.result(T)


def test_an_oom_recycle_lets_the_jobs_already_handed_over_finish_once(supervisor_from, tmp_path):
    """They may have started by the time the OOM is read: killing the worker
    then would run them twice."""
    marks = tmp_path / "marks"
    marking = {"loader": "tests.helpers.loaders:marking", "args": {"path": str(marks)}}
    sup = supervisor_from(config_text({"m": marking}, supervisor={"window": 4}))
    sup.switch_mode("m").result(T)
    from supervisor import OutOfMemory

    oom = sup.submit("oom")
    after = [sup.submit("mark", i) for i in range(3)]
    with pytest.raises(OutOfMemory):
        oom.result(T)
    assert [f.result(T) for f in after] == [0, 1, 2]
    assert marks.read_text().split() == ["0", "1", "2"]  # each ran once
    wait_until(lambda: sup.status()["worker_pid"] is None, T, "the recycle once the window was empty")
    assert sup.status()["oom_recycles"] == 1
