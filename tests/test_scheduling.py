"""The queue's policy with real workers: jobs grouped by mode, each caller's
jobs for a mode in the order it submitted them, another mode's turn at the
starvation bound, switches as barriers, exactly one outcome per job. The
rules are checked by the order outcomes come in and by counting worker
generations (one per switch), never by timing."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import T
from tests.helpers.config import DIAG, config_text

pytestmark = pytest.mark.process


def _two_modes(max_wait: float = 5.0, **supervisor) -> str:
    return config_text({"a": DIAG, "b": DIAG}, supervisor={"max_wait_s": max_wait, "warm_standby": False, **supervisor})


def _record(future, done: list, lock: threading.Lock, label) -> None:
    def note(_):
        with lock:
            done.append(label)

    future.add_done_callback(note)


def test_two_callers_alternating_two_modes_get_grouped_and_keep_their_order(supervisor_from):
    sup = supervisor_from(_two_modes())
    sup.switch_mode("a").result(T)
    done: list = []
    lock = threading.Lock()
    futures = []
    gate = threading.Event()

    def caller(name: str) -> None:
        gate.wait(T)
        for n in range(40):
            mode = "ab"[n % 2]
            future = sup.submit("sleep", {"seconds": 0.005, "who": [name, n]}, mode=mode)
            _record(future, done, lock, (name, mode, n))
            futures.append(future)

    callers = [threading.Thread(target=caller, args=(name,)) for name in ("x", "y")]
    for t in callers:
        t.start()
    gate.set()
    for t in callers:
        t.join(T)
    for future in futures:
        future.result(T)  # one outcome each: a result
    switches = sup.status()["generation"] - 1
    assert switches <= 4, f"{switches} switches for 80 jobs in 2 modes (FIFO would pay about 80)"
    for name in ("x", "y"):
        for mode in "ab":
            mine = [n for who, m, n in done if who == name and m == mode]
            assert mine == sorted(mine), f"{name}'s jobs for mode {mode} ran out of order: {mine}"
    assert len(done) == 80


def test_another_mode_gets_its_turn_at_the_starvation_bound(supervisor_from):
    """Mode a is kept busy by a stream of jobs that never runs dry; a job for
    mode b still runs before that stream ends, once it has waited max_wait_s,
    instead of waiting for every a job."""
    sup = supervisor_from(_two_modes(max_wait=0.3))
    sup.switch_mode("a").result(T)
    done: list = []
    lock = threading.Lock()
    stop = threading.Event()
    a_jobs = []

    def keep_a_busy() -> None:
        n = 0
        while not stop.is_set() and n < 2000:
            future = sup.submit("sleep", {"seconds": 0.01}, mode="a")
            _record(future, done, lock, ("a", n))
            a_jobs.append(future)
            n += 1
            if sum(1 for f in a_jobs[-50:] if not f.done()) > 20:
                a_jobs[-20].result(T)  # keep about 20 waiting: the loaded mode always has work

    feeder = threading.Thread(target=keep_a_busy)
    feeder.start()
    try:
        b = sup.submit("pid", mode="b")
        _record(b, done, lock, ("b", 0))
        b.result(T)
        with lock:
            a_before_b = sum(1 for label in done if label[0] == "a")
    finally:
        stop.set()
        feeder.join(T)
    for future in a_jobs:
        future.result(T)
    assert a_before_b < len(a_jobs), "b waited until mode a ran dry"
    assert sup.status()["generation"] >= 3  # a, then b at its turn, then a again


def test_a_switch_is_a_barrier_the_grouping_never_crosses(supervisor_from):
    sup = supervisor_from(_two_modes())
    sup.switch_mode("a").result(T)
    blocker = sup.submit("sleep", {"seconds": 0.3})  # holds the worker while the rest is queued
    done: list = []
    lock = threading.Lock()
    before = sup.submit("pid", mode="b")
    barrier = sup.switch_mode("a")
    after = sup.submit("pid", mode="a")
    for label, future in (("before", before), ("barrier", barrier), ("after", after)):
        _record(future, done, lock, label)
    blocker.result(T)
    assert after.result(T) and before.result(T) and barrier.result(T)["status"] == "loaded"
    assert done == ["before", "barrier", "after"]  # a was loaded, but the a job came after the barrier


def test_a_job_naming_no_mode_runs_in_the_mode_its_caller_saw(supervisor_from):
    sup = supervisor_from(_two_modes())
    sup.switch_mode("a").result(T)
    a_pid = sup.submit("pid").result(T)
    hold = sup.submit("sleep", {"seconds": 0.3})
    in_b = sup.submit("pid", mode="b")
    plain = sup.submit("pid")  # after a job for b: b is the mode it would find
    loaded_a = [sup.submit("pid", mode="a") for _ in range(3)]  # a is loaded: these go first
    hold.result(T)
    assert [f.result(T) for f in loaded_a] == [a_pid] * 3
    assert plain.result(T) == in_b.result(T) != a_pid


def test_status_shows_what_waits_for_each_mode(supervisor_from):
    sup = supervisor_from(_two_modes())
    sup.switch_mode("a").result(T)
    hold = sup.submit("sleep", {"seconds": 0.5})
    waiting = [sup.submit("echo", n, mode=mode) for n, mode in enumerate("abb")]
    status = None
    for _ in range(200):
        status = sup.status()
        if status["waiting"].get("b", {}).get("jobs") == 2:
            break
        threading.Event().wait(0.01)
    assert status["waiting"]["b"]["jobs"] == 2 and status["waiting"]["a"]["jobs"] == 1
    assert status["waiting"]["b"]["oldest_s"] >= 0.0
    hold.result(T)
    assert [f.result(T) for f in waiting] == [0, 1, 2]
    assert sup.status()["waiting"] == {}


@pytest.mark.parametrize("max_wait", [0.0])
def test_max_wait_0_serves_modes_in_arrival_order(supervisor_from, max_wait):
    sup = supervisor_from(_two_modes(max_wait=max_wait))
    sup.switch_mode("a").result(T)
    hold = sup.submit("sleep", {"seconds": 0.3})
    done: list = []
    lock = threading.Lock()
    for n, mode in enumerate("bab"):
        _record(sup.submit("echo", n, mode=mode), done, lock, n)
    hold.result(T)
    for _ in range(500):
        if len(done) == 3:
            break
        threading.Event().wait(0.01)
    assert done == [0, 1, 2]


# ---------------------------------------------------------------- batches


def _batching(batch: dict | None = None) -> str:
    mode = {"loader": DIAG, **({"batch": batch} if batch else {})}
    return config_text({"diag": mode}, supervisor={"warm_standby": False})


def _queued_behind_a_sleep(sup, task: str, n: int, seconds: float = 0.3, **submit) -> list:
    """``n`` jobs for ``task`` submitted while the worker runs a sleep: they
    are all waiting when the worker comes free."""
    hold = sup.submit("sleep", {"seconds": seconds})
    futures = [sup.submit(task, i, **submit) for i in range(n)]
    hold.result(T)
    return futures


def test_jobs_for_a_batch_handler_run_together_and_each_gets_its_own_result(supervisor_from):
    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    futures = _queued_behind_a_sleep(sup, "batch_echo", 20)
    results = [f.result(T) for f in futures]
    assert [r["payload"] for r in results] == list(range(20))
    sizes = [r["batch"] for r in results]
    assert max(sizes) == 8  # the handler's max_batch: 20 waiting jobs make full batches
    assert all(1 <= size <= 8 for size in sizes)
    batches = sup.status()["batches"]
    assert batches["largest"] == 8 and batches["jobs"] >= 16
    assert batches["count"] == len(set(_runs(sizes)))


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    """The batches as (first index, size), read off each result's batch size
    (consecutive jobs, since one task's jobs keep their order)."""
    runs, i = [], 0
    while i < len(sizes):
        runs.append((i, sizes[i]))
        i += sizes[i]
    return [run for run in runs if run[1] > 1]


def test_a_batch_that_fails_fails_each_of_its_jobs_once(supervisor_from):
    from protocol import JobFailed

    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    futures = _queued_behind_a_sleep(sup, "batch_fail", 10)
    for future in futures:
        with pytest.raises(JobFailed, match="batch_fail on purpose"):
            future.result(T)
    assert sup.submit("batch_echo", "after").result(T)["payload"] == "after"  # the worker lives on
    assert sup.status()["restarts"] == 0


def test_a_cancelled_job_is_never_part_of_a_batch(supervisor_from):
    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    hold = sup.submit("sleep", {"seconds": 0.3})
    futures = [sup.submit("batch_echo", i) for i in range(6)]
    assert futures[2].cancel() and futures[4].cancel()
    hold.result(T)
    kept = [f.result(T) for n, f in enumerate(futures) if n not in (2, 4)]
    assert [r["payload"] for r in kept] == [0, 1, 3, 5]
    assert {r["batch"] for r in kept} == {4}  # the four that were left, in one batch
    assert futures[2].cancelled() and futures[4].cancelled()


def test_the_config_can_turn_a_handlers_batching_off(supervisor_from):
    sup = supervisor_from(_batching({"batch_echo": {"max_batch": 1}}))
    sup.switch_mode("diag").result(T)
    futures = _queued_behind_a_sleep(sup, "batch_echo", 6)
    assert [f.result(T)["batch"] for f in futures] == [1] * 6
    assert sup.status()["batches"]["count"] == 0


def test_the_config_can_make_a_batch_smaller(supervisor_from):
    sup = supervisor_from(_batching({"batch_echo": {"max_batch": 3}}))
    sup.switch_mode("diag").result(T)
    futures = _queued_behind_a_sleep(sup, "batch_echo", 9)
    sizes = [f.result(T)["batch"] for f in futures]
    assert max(sizes) == 3


def test_a_lone_job_for_a_batch_handler_runs_alone(supervisor_from):
    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    assert sup.submit("batch_echo", "alone").result(T) == {"payload": "alone", "batch": 1}


def test_a_caller_one_job_at_a_time_waits_for_no_batch_but_a_burst_still_batches(supervisor_from):
    """max_delay_ms is 60 s here: a job waiting for others to fill its batch
    would not be answered within the 20 s each job is given. A caller that
    sends its next job when the last one answers never waits (after a batch
    of one, the next job goes at once); jobs that came together are batched
    whatever the delay, and after such a batch the next job does wait for
    company (the delay is that long here, so it goes with the burst after it)."""
    sup = supervisor_from(_batching({"batch_echo": {"max_batch": 8, "max_delay_ms": 60_000}}))
    sup.switch_mode("diag").result(T)
    for n in range(5):
        assert sup.submit("batch_echo", n).result(20) == {"payload": n, "batch": 1}
    futures = _queued_behind_a_sleep(sup, "batch_echo", 4)
    assert [f.result(20)["batch"] for f in futures] == [4] * 4
    waiting = sup.submit("batch_echo", "waits")
    burst = [sup.submit("batch_echo", n) for n in range(7)]
    assert waiting.result(20)["batch"] == 8 and [f.result(20)["batch"] for f in burst] == [8] * 7


def test_batches_take_only_their_own_task_and_keep_the_order_with_other_tasks(supervisor_from):
    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    hold = sup.submit("sleep", {"seconds": 0.3})
    done: list = []
    lock = threading.Lock()
    plan = ["b", "b", "e", "b", "b", "e", "b"]
    futures = []
    for n, kind in enumerate(plan):
        future = sup.submit("batch_echo" if kind == "b" else "echo", n)
        _record(future, done, lock, n)
        futures.append(future)
    hold.result(T)
    results = [f.result(T) for f in futures]
    assert [r["payload"] if isinstance(r, dict) else r for r in results] == list(range(len(plan)))
    # a batch never jumps over a job of another task queued before its jobs
    assert [r["batch"] for r in results if isinstance(r, dict)] == [2, 2, 2, 2, 1]


def test_a_job_whose_timeout_passes_in_a_batch_times_out_and_the_rest_get_one_outcome_each(supervisor_from):
    """A batch runs as one call: when one job's timeout passes, the worker is
    killed (the only way to stop a call). That job gets JobTimeout; the
    others of the batch, which the worker was running too, get
    WorkerCrashed, or run again on the next worker if their caller allowed a
    retry."""
    from protocol import JobTimeout, WorkerCrashed

    sup = supervisor_from(_batching())
    sup.switch_mode("diag").result(T)
    hold = sup.submit("sleep", {"seconds": 0.3})
    short = sup.submit("batch_sleep", {"seconds": 5}, timeout=0.5)
    plain = sup.submit("batch_sleep", {"seconds": 0})
    retried = sup.submit("batch_sleep", {"seconds": 0}, retries=1)
    hold.result(T)
    with pytest.raises(JobTimeout):
        short.result(T)
    with pytest.raises(WorkerCrashed):
        plain.result(T)
    assert retried.result(T) == {"payload": {"seconds": 0}, "batch": 1}  # alone on the next worker
    assert sup.submit("batch_echo", "after").result(T)["payload"] == "after"


def test_kills_mid_batch_give_every_job_exactly_one_outcome(supervisor_from):
    """Workers killed from outside while batches run: every job ends once,
    with its result (first time, or on a retry) or WorkerCrashed."""
    import os
    import signal

    from protocol import WorkerCrashed

    text = config_text({"diag": DIAG}, supervisor={"warm_standby": False, "max_restarts": 100, "restart_backoff": 0.0})
    sup = supervisor_from(text)
    sup.switch_mode("diag").result(T)
    settled: list[int] = []
    lock = threading.Lock()

    def note(n: int):
        def done(_):
            with lock:
                settled.append(n)

        return done

    futures = []
    for n in range(120):
        future = sup.submit("batch_sleep", {"seconds": 0.02, "n": n}, retries=n % 2)
        future.add_done_callback(note(n))
        futures.append(future)
    kills = 0
    while kills < 6 and not all(f.done() for f in futures):
        status = sup.status()
        if status["worker_state"] == "busy" and status["worker_pid"]:
            try:
                os.kill(status["worker_pid"], signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        threading.Event().wait(0.03)
    results = crashed = 0
    for n, future in enumerate(futures):
        error = future.exception(T)
        if error is None:
            assert future.result()["payload"]["n"] == n
            results += 1
        else:
            assert isinstance(error, WorkerCrashed), error
            crashed += 1
    with lock:
        assert sorted(settled) == list(range(120))  # each job's Future settled exactly once
    assert results + crashed == 120 and kills >= 1 and crashed >= 1
