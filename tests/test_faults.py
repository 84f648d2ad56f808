"""Every job gets exactly one outcome, whatever the worker does: the crash
matrix, retries, the restart budget, backpressure. Real processes; each
fault is injected for real (a real segfault, a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from supervisor import (
    JobFailed,
    ModeBroken,
    ModeLoadError,
    NoModeLoaded,
    QueueFull,
    Supervisor,
    SupervisorFailed,
    WorkerCrashed,
)
from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import DIAG, DIAG_HOOKS, config_text

pytestmark = pytest.mark.process

MODES = {
    "diag": DIAG_HOOKS,  # crash's say and once_file
    "other": {"loader": "tests.helpers.loaders:tagged", "args": {"tag": "other"}},
    "load_exit7": {"loader": "tests.helpers.loaders:exits", "args": {"code": 7}},
    "load_exit0": {"loader": "tests.helpers.loaders:exits", "args": {"code": 0}},
    "load_segfault": "tests.helpers.loaders:segfaults",
    "load_sigkill": "tests.helpers.loaders:kills_itself",
    "load_raise": "tests.helpers.loaders:raises",
    "load_says": "tests.helpers.loaders:says_then_exits",
}


@pytest.fixture
def faults(supervisor_from):
    def make(max_restarts: int = 100, backoff: float = 0.0, max_queue: int = 10_000, retry: float = 30.0):
        supervisor = {"heartbeat_interval": 0.2, "heartbeat_timeout": 10.0, "load_timeout": 60.0, "stop_timeout": 2.0,
                      "max_restarts": max_restarts, "restart_window": 60.0, "restart_backoff": backoff,
                      "restart_backoff_max": 1.0, "max_queue": max_queue, "broken_retry_s": retry}  # fmt: skip
        return supervisor_from(config_text(MODES, supervisor=supervisor))

    return make


# ---------------------------------------------------------------- the crash matrix

# How a serving worker dies, and the words its crash report must contain.
WAYS = {
    "exit7": ({"how": "exit", "code": 7}, "exited with code 7"),
    "exit0": ({"how": "exit", "code": 0}, "exited with code 0"),
    "segfault": ({"how": "segfault"}, "killed by SIGSEGV(-11)"),
    "sigkill_outside": (None, "killed by SIGKILL(-9)"),  # the test kills it, like the OOM killer would
}


def inject(sup: Supervisor, way: str, after: float) -> None:
    """Make the current worker die ``after`` seconds from now, ``way``."""
    how, _ = WAYS[way]
    if how is None:
        pid = sup.status()["worker_pid"]
        threading.Timer(after, os.kill, (pid, signal.SIGKILL)).start()
    else:
        assert sup.submit("crash", {**how, "after": after}).result(T) == {"dying_in": after}


@pytest.mark.parametrize("way", list(WAYS))
def test_crash_while_idle_fails_nothing_and_the_next_job_gets_a_new_worker(faults, way):
    sup = faults()
    sup.switch_mode("diag").result(T)
    pid = sup.submit("pid").result(T)
    inject(sup, way, after=0.1)
    wait_until(lambda: sup.status()["restarts"] == 1, T, "the idle worker's death to be noticed")
    assert pid_gone(pid)
    assert sup.submit("pid").result(T) != pid
    assert sup.status()["mode"] == "diag"


@pytest.mark.parametrize("way", list(WAYS))
def test_crash_mid_job_fails_that_job_with_the_cause_and_leaves_the_queue_alone(faults, way):
    sup = faults()
    sup.switch_mode("diag").result(T)
    pid = sup.submit("pid").result(T)
    inject(sup, way, after=0.3)
    victim = sup.submit("sleep", {"seconds": 30})
    behind = [sup.submit("echo", i) for i in range(5)]
    with pytest.raises(WorkerCrashed) as info:
        victim.result(T)
    assert WAYS[way][1] in str(info.value) and f"pid {pid}" in str(info.value)
    assert [f.result(T) for f in behind] == list(range(5))
    assert sup.status()["restarts"] == 1


@pytest.mark.parametrize("way", list(WAYS))
def test_crash_during_a_drain_fails_the_job_and_the_drain_still_finishes_the_queue(faults, way):
    sup = faults()
    sup.switch_mode("diag").result(T)
    inject(sup, way, after=0.4)
    victim = sup.submit("sleep", {"seconds": 30})
    behind = [sup.submit("echo", i) for i in range(5)]
    wait_until(lambda: sup.status()["in_flight"] >= 1, T, "the victim job to start")
    sup.shutdown(drain=True)
    with pytest.raises(WorkerCrashed, match=WAYS[way][1].replace("(", r"\(").replace(")", r"\)")):
        victim.result(0)
    assert [f.result(0) for f in behind] == list(range(5)), "the drain respawned the mode to finish the queue"
    assert sup.status()["state"] == "stopped"


@pytest.mark.parametrize("way", list(WAYS))
def test_crash_while_a_switch_waits_fails_only_the_job_and_the_switch_goes_through(faults, way):
    sup = faults()
    sup.switch_mode("diag").result(T)
    inject(sup, way, after=0.4)
    victim = sup.submit("sleep", {"seconds": 30})
    switch = sup.switch_mode("other")
    after = sup.submit("tag")
    with pytest.raises(WorkerCrashed):
        victim.result(T)
    assert switch.result(T)["status"] == "loaded"
    assert after.result(T)["tag"] == "other"


@pytest.mark.parametrize(
    "mode, words",
    [
        ("load_exit7", "exited with code 7"),
        ("load_exit0", "exited with code 0"),
        ("load_segfault", "killed by SIGSEGV(-11)"),
        ("load_sigkill", "killed by SIGKILL(-9)"),
        ("load_raise", "RuntimeError: this loader fails on purpose"),
    ],
)
def test_crash_while_loading_fails_the_switch_once_and_never_loops(faults, mode, words):
    sup = faults()
    sup.switch_mode("diag").result(T)
    with pytest.raises(ModeLoadError) as info:
        sup.switch_mode(mode).result(T)
    assert words in str(info.value)
    time.sleep(0.5)  # room for a restart loop to show itself, if there were one
    status = sup.status()
    assert status["restarts"] == 0 and status["generation"] == 2 and status["worker_pid"] is None
    assert sup.switch_mode("other").result(T)["status"] == "loaded"


# ---------------------------------------------------------------- crash reports


def test_a_crash_report_carries_the_last_lines_of_the_workers_stderr(faults):
    sup = faults()
    sup.switch_mode("diag").result(T)
    with pytest.raises(WorkerCrashed) as info:
        sup.submit("crash", {"how": "segfault", "say": "kernel 7 wrote past its buffer (last words)"}).result(T)
    assert "kernel 7 wrote past its buffer (last words)" in str(info.value)
    assert "kernel 7 wrote past its buffer (last words)" in info.value.details["stderr_tail"]
    with pytest.raises(ModeLoadError, match="CUDA out of memory \\(pretend\\)"):
        sup.switch_mode("load_says").result(T)


# ---------------------------------------------------------------- retries


def test_an_idempotent_job_runs_again_after_a_crash(faults, tmp_path):
    sup = faults()
    sup.switch_mode("diag").result(T)
    marker = str(tmp_path / "crashed-once")
    job = sup.submit("crash", {"how": "segfault", "once_file": marker}, retries=1)
    assert job.result(T) == "survived"
    assert sup.status()["restarts"] == 1


def test_retries_run_out_and_then_the_job_fails(faults):
    sup = faults()
    sup.switch_mode("diag").result(T)
    behind = sup.submit("echo", "behind")
    job = sup.submit("crash", {"how": "kill"}, retries=2)
    ahead_of_it = sup.submit("echo", "after")
    with pytest.raises(WorkerCrashed):
        job.result(T)
    assert sup.status()["restarts"] == 3, "one run and two retries"
    assert behind.result(T) == "behind" and ahead_of_it.result(T) == "after"


def test_a_timeout_or_a_handler_error_is_not_retried(faults):
    sup = faults()
    sup.switch_mode("diag").result(T)
    from supervisor import JobTimeout

    with pytest.raises(JobTimeout):
        sup.submit("sleep", {"seconds": 30}, timeout=0.3, retries=3).result(T)
    assert sup.status()["restarts"] == 1
    with pytest.raises(JobFailed):
        sup.submit("fail", retries=3).result(T)
    with pytest.raises(TypeError, match="retries must be a whole number"):
        sup.submit("echo", retries=-1)


# ---------------------------------------------------------------- the restart budget


def test_past_the_restart_budget_the_mode_is_broken_alone_until_a_switch(faults):
    """Three deaths of ``diag`` in the window, two allowed: ``diag`` is
    broken, its jobs fail at once naming the last failure and when it is
    tried again; another mode serves on and the supervisor is not failed.
    An operator's switch to it tries it now."""
    sup = faults(max_restarts=2, backoff=0.05)
    sup.switch_mode("diag").result(T)
    for _ in range(3):  # three deaths in the window; two are allowed
        with pytest.raises(WorkerCrashed):
            sup.submit("crash", {"how": "kill"}).result(T)
    status = sup.status()
    assert status["state"] == "running" and status["failed_reason"] is None
    assert list(status["broken_modes"]) == ["diag"], status["broken_modes"]
    assert "3 failures in 60s" in status["broken_modes"]["diag"]["reason"]
    assert 0 < status["broken_modes"]["diag"]["retry_in_s"] <= 30
    with pytest.raises(ModeBroken, match="mode 'diag' is broken: 3 failures.*SIGKILL.*tried again in 30s") as caught:
        sup.submit("echo", 1).result(T)
    assert isinstance(caught.value, SupervisorFailed) and 0 < caught.value.retry_in <= 30
    assert sup.submit("tag", mode="other").result(T)["tag"] == "other", "another mode serves on"
    with pytest.raises(ModeBroken):
        sup.submit("echo", 1, mode="diag").result(T)
    result = sup.switch_mode("diag").result(T)
    assert result["status"] == "loaded"
    assert sup.status()["state"] == "running" and sup.status()["broken_modes"] == {}
    assert sup.submit("echo", 2).result(T) == 2


def test_a_broken_mode_is_tried_again_by_itself_after_broken_retry_s(faults):
    sup = faults(max_restarts=0, retry=1.0)
    sup.switch_mode("diag").result(T)
    with pytest.raises(WorkerCrashed):
        sup.submit("crash", {"how": "kill"}).result(T)
    with pytest.raises(ModeBroken, match="tried again in 1s"):
        sup.submit("echo", 1).result(T)
    wait_until(lambda: sup.status()["broken_modes"] == {}, T, "diag to be due for a retry")
    assert sup.submit("echo", "back").result(T) == "back", "the trial load works: diag serves again"
    with pytest.raises(WorkerCrashed):
        sup.submit("crash", {"how": "kill"}).result(T)
    with pytest.raises(ModeBroken, match="tried again in 2s"):  # broken again soon after: the wait doubles
        sup.submit("echo", 1).result(T)


def test_when_every_mode_is_broken_the_supervisor_is_failed(supervisor_from):
    sup = supervisor_from(config_text({"a": "tests.helpers.loaders:raises", "b": "tests.helpers.loaders:raises"},
                                      supervisor={"max_restarts": 0, "warm_standby": False}))  # fmt: skip
    for mode in ("a", "b"):
        with pytest.raises(ModeLoadError):
            sup.submit("x", mode=mode).result(T)
        assert sup.status()["state"] == ("failed" if mode == "b" else "running")
    assert sup.status()["failed_reason"].startswith("every mode is broken (a: 1 failure in 60s")
    with pytest.raises(ModeBroken):
        sup.submit("x", mode="a").result(T)


_MODULES = {
    "broken_syntax.py": "def load(:\n    return {}\n",
    "imports_missing.py": "import os\nimport some_missing_lib\n\n\ndef load():\n    return {}\n",
}


@pytest.mark.parametrize("loader, why", [
    ("no_such_module:load", "cannot import 'no_such_module': no such module in .*loader_path"),
    ("tests.helpers.no_such_module:load", "cannot import 'tests.helpers.no_such_module': no such module"),
    ("broken_syntax:load", r"broken_syntax.py:1: invalid syntax"),
    ("imports_missing:load", "imports_missing.py:2 imports 'some_missing_lib', which is not installed"),
])  # fmt: skip
def test_a_switch_to_a_mode_that_cannot_be_imported_keeps_the_serving_mode(supervisor_from, tmp_path, loader, why):
    """Found before anything is stopped: the worker that serves, and its
    mode, are untouched (on main the serving mode was killed first)."""
    folder = tmp_path / "modes"
    folder.mkdir()
    for name, text in _MODULES.items():
        (folder / name).write_text(text)
    sup = supervisor_from(config_text({"diag": DIAG, "typo": loader}, supervisor={"loader_path": [str(folder)]}))
    pid = sup.submit("pid", mode="diag").result(T)
    with pytest.raises(ModeLoadError, match=why):
        sup.switch_mode("typo").result(T)
    with pytest.raises(ModeLoadError, match="needs mode 'typo', which failed to load: mode 'typo': cannot import"):
        sup.submit("x", mode="typo").result(T)
    status = sup.status()
    assert status["mode"] == "diag" and status["worker_pid"] == pid and status["generation"] == 1
    assert sup.submit("pid").result(T) == pid, "a job naming no mode still runs in diag, in the same worker"


def test_a_loader_that_raises_breaks_its_mode_and_no_other(faults):
    """The issue's case: requests for a model whose loader raises spend that
    model's budget alone (on main they spent the global one: every model
    answered supervisor_failed until an operator restarted)."""
    sup = faults(max_restarts=5)
    assert sup.submit("tag", mode="other").result(T)["tag"] == "other"
    for _ in range(6):
        with pytest.raises(ModeLoadError, match="raise"):
            sup.submit("x", mode="load_raise").result(T)
    with pytest.raises(ModeBroken, match="mode 'load_raise' is broken"):
        sup.submit("x", mode="load_raise").result(T)
    status = sup.status()
    assert status["state"] == "running" and list(status["broken_modes"]) == ["load_raise"]
    assert sup.submit("tag", mode="other").result(T)["tag"] == "other"
    assert sup.submit("echo", 1, mode="diag").result(T) == 1


def test_jobs_queued_when_the_budget_runs_out_fail_up_to_the_next_switch(faults):
    sup = faults(max_restarts=0)
    sup.switch_mode("diag").result(T)
    doomed = sup.submit("crash", {"how": "kill"})
    queued = [sup.submit("echo", i) for i in range(3)]
    switch = sup.switch_mode("other")
    after_switch = sup.submit("tag")
    with pytest.raises(WorkerCrashed):
        doomed.result(T)
    for f in queued:
        with pytest.raises(ModeBroken):
            f.result(T)
    assert switch.result(T)["status"] == "loaded"
    assert after_switch.result(T)["tag"] == "other"


def test_restart_clears_the_failed_state_and_gives_a_fresh_worker(faults):
    sup = faults(max_restarts=0)
    with pytest.raises(NoModeLoaded, match="restart\\(\\): no mode is loaded"):
        sup.restart().result(T)
    sup.switch_mode("diag").result(T)
    first = sup.submit("pid").result(T)
    again = sup.restart().result(T)
    assert again["status"] == "restarted" and again["pid"] != first and pid_gone(first)
    with pytest.raises(WorkerCrashed):
        sup.submit("crash", {"how": "kill"}).result(T)
    assert list(sup.status()["broken_modes"]) == ["diag"]
    assert sup.restart().result(T)["status"] == "restarted"
    assert sup.submit("echo", "back").result(T) == "back"


def test_respawns_back_off_exponentially(faults, caplog):
    sup = faults(max_restarts=10, backoff=0.05)
    sup.switch_mode("diag").result(T)
    for _ in range(4):
        with pytest.raises(WorkerCrashed):
            sup.submit("crash", {"how": "kill"}).result(T)
    assert sup.submit("echo", 1).result(T) == 1
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert waits == [
        "respawn 2 in this window: waiting 0.05s first",
        "respawn 3 in this window: waiting 0.10s first",
        "respawn 4 in this window: waiting 0.20s first",
    ]


# ---------------------------------------------------------------- backpressure


def test_past_max_queue_submit_raises_queue_full_at_once_and_slots_come_back(faults):
    sup = faults(max_queue=3)
    sup.switch_mode("diag").result(T)
    held = [sup.submit("sleep", {"seconds": 0.3}) for _ in range(3)]
    with pytest.raises(QueueFull, match="3 jobs"):
        sup.submit("echo", "one too many").result(0)  # failed at once, as through the daemon
    for f in held:
        f.result(T)
    cancelled = [sup.submit("sleep", {"seconds": 0.3}) for _ in range(3)]
    assert cancelled[2].cancel()
    assert sup.submit("echo", "a freed slot").result(T) == "a freed slot"


def test_the_configured_job_timeout_applies_when_a_job_names_none(write_config):
    path = write_config(config_text(supervisor={"job_timeout": 0.3}))
    with Supervisor(path) as sup:
        sup.switch_mode("diag").result(T)
        from supervisor import JobTimeout

        with pytest.raises(JobTimeout, match="ran past its 0.3s timeout"):
            sup.submit("sleep", {"seconds": 30}).result(T)
        assert sup.submit("sleep", {"seconds": 1}, timeout=30).result(T) == {"slept": 1}, "a job's own timeout wins"
        assert sup.submit("sleep", {"seconds": 1}, timeout=0).result(T) == {"slept": 1}, "0: no timeout at all"


# ---------------------------------------------------------------- regressions from review


def test_a_job_submitted_right_after_the_clearing_switch_runs(faults):
    """switch_mode(); submit() leaves the failed state for the job too, even
    when both land in the same turn of the loop."""
    sup = faults(max_restarts=0)
    sup.switch_mode("diag").result(T)
    for _ in range(5):
        with pytest.raises(WorkerCrashed):
            sup.submit("crash", {"how": "kill"}).result(T)
        wait_until(lambda: "diag" in sup.status()["broken_modes"], T, "diag to be broken")
        switch, job = sup.switch_mode("diag"), sup.submit("echo", "after the switch")
        assert switch.result(T)["status"] == "loaded"
        assert job.result(T) == "after the switch"


def test_a_same_mode_switch_does_not_reset_the_restart_budget(faults):
    sup = faults(max_restarts=2, backoff=0.01)
    for _ in range(3):
        sup.switch_mode("diag").result(T)
        with pytest.raises(WorkerCrashed):
            sup.submit("crash", {"how": "kill"}).result(T)
    wait_until(lambda: "diag" in sup.status()["broken_modes"], T, "three deaths to exhaust a budget of two")


def test_a_retried_job_that_exhausts_the_budget_keeps_its_crash_report(faults):
    sup = faults(max_restarts=0)
    sup.switch_mode("diag").result(T)
    with pytest.raises(WorkerCrashed, match="SIGKILL.*mode 'diag' is broken now"):
        sup.submit("crash", {"how": "kill"}, retries=3).result(T)


def test_cancelled_jobs_do_not_pile_up_past_max_queue(faults):
    sup = faults(max_queue=8)
    sup.switch_mode("diag").result(T)
    sup.submit("sleep", {"seconds": 3})
    wait_until(lambda: sup.status()["in_flight"] >= 1, T, "the long job to start")
    for _ in range(200):
        assert sup.submit("echo", b"x" * 100_000).cancel()
    sup.submit("echo", "poke")  # a turn of the loop
    wait_until(lambda: sup.status()["queued"] <= 9, T, "the cancelled jobs to be dropped from the queue")


def test_a_caller_woken_by_its_result_always_finds_its_queue_slot_free(faults):
    import sys

    sup = faults(max_queue=4)
    sup.switch_mode("diag").result(T)
    full: list[BaseException] = []

    def caller():
        for i in range(300):
            try:
                sup.submit("echo", i).result(T)
            except QueueFull as exc:
                full.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make the race as likely as we can
    try:
        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
    finally:
        sys.setswitchinterval(old)
    assert full == [], f"{len(full)} QueueFull with never more than max_queue jobs outstanding"


def test_a_worker_flooding_stderr_cannot_stall_the_loop_even_if_nobody_reads_our_stderr(tmp_path):
    """The supervisor's stderr is a pipe nobody reads, and its worker floods
    stderr: job timeouts and shutdown still work, because the loop hands the
    worker's bytes to a forwarder thread and never writes them itself. (The
    program's own log goes to a file: where a program sends its logging is
    its business, and a blocked log handler blocks whoever logs.)"""
    import subprocess
    import sys

    config = tmp_path / "g.toml"
    config.write_text(config_text({"diag": DIAG_HOOKS}))  # chatter: a test hook
    script = tmp_path / "flood.py"
    script.write_text(
        "import json, logging, sys\n"
        f"logging.basicConfig(filename={str(tmp_path / 'flood.log')!r})\n"
        "from supervisor import Supervisor, JobTimeout\n"
        f"sup = Supervisor({str(config)!r}).start()\n"
        "sup.switch_mode('diag').result(60)\n"
        "try:\n"
        "    sup.submit('chatter', {'seconds': 30}, timeout=1.5).result(60)\n"
        "    out = 'no timeout'\n"
        "except JobTimeout:\n"
        "    out = 'JobTimeout'\n"
        "print(json.dumps({'job': out, 'next': sup.submit('echo', 1).result(60)}), flush=True)\n"
        "sup.shutdown(drain=False)\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.strip() == '{"job": "JobTimeout", "next": 1}', first
        assert proc.stdout.readline().strip() == "stopped"
    finally:
        proc.kill()
        proc.wait(T)
        proc.stdout.close()
        proc.stderr.close()
