"""The loop's parts on their own, in milliseconds: the queue's order and
barriers, the restart budget and the deadline table, against bare Futures
and a fake clock. The real processes are in the other test files."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from protocol import GpuvisorError
from supervisor.engine.budget import RestartBudget
from supervisor.engine.commands import QueuedJob, QueuedSwitch
from supervisor.engine.deadlines import Deadline, Deadlines
from supervisor.engine.queue import JobQueue
from supervisor.futures import JobFuture

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def job(n: int, mode: str | None = None) -> QueuedJob:
    return QueuedJob(n, "echo", [b""], mode, None, JobFuture())


def switch(mode: str, explicit: bool = True) -> QueuedSwitch:
    return QueuedSwitch(mode, Future() if explicit else None)


# ---------------------------------------------------------------- the queue


def queue(clock: Clock, max_wait: float = 2.0) -> JobQueue:
    return JobQueue(max_wait=lambda mode: max_wait, clock=clock)


def test_one_mode_is_first_in_first_out_and_cancelled_jobs_are_dropped_as_they_surface():
    q = queue(Clock())
    a, b, c = job(1, "x"), job(2, "x"), job(3, "x")
    for item in (a, b, c):
        q.append(item)
    assert q.next("x") is a
    q.take(a)
    assert b.future.cancel()
    assert q.next("x") is c and len(q) == 1


def test_the_loaded_modes_jobs_go_first_and_each_mode_keeps_its_order():
    clock = Clock()
    q = queue(clock)
    order = [job(1, "x"), job(2, "y"), job(3, "x"), job(4, "y"), job(5, "x")]
    for item in order:
        q.append(item)
        clock.now += 0.01
    taken = []
    while (item := q.next("y")) is not None:
        q.take(item)
        taken.append(item.id)
    assert taken == [2, 4, 1, 3, 5]  # y is loaded: its jobs, then x's, each in the order they came


def test_another_modes_oldest_job_gets_its_turn_once_it_has_waited_max_wait():
    clock = Clock()
    q = queue(clock, max_wait=2.0)
    old_x = job(1, "x")
    q.append(old_x)
    for n in range(2, 5):
        q.append(job(n, "y"))
    assert q.next("y").id == 2  # x has waited 0 s
    clock.now += 2.0
    assert q.next("y") is old_x  # the starvation bound: x's turn, though y's jobs wait


def test_a_mode_that_gets_its_turn_keeps_it_for_max_wait_while_it_has_work():
    """Both modes' jobs have waited past the bound: counting from when the
    loaded mode's turn began keeps the two from taking the worker from each
    other before either runs a job."""
    clock = Clock()
    q = queue(clock, max_wait=2.0)
    q.append(job(1, "a"))
    q.append(job(2, "b"))
    clock.now += 10
    assert q.next("b", float("inf")).mode == "b"  # b just became loaded: its first job runs
    turn = clock.now  # ... now
    clock.now += 1.9
    assert q.next("b", turn).mode == "b"
    clock.now += 0.2
    assert q.next("b", turn).mode == "a"  # b has had its turn


def test_modes_waiting_take_their_turn_oldest_first():
    clock = Clock()
    q = queue(clock)
    for n, mode in enumerate(["b", "c", "a"], 1):
        q.append(job(n, mode))
        clock.now += 1
    assert q.next("z").mode == "b"  # the loaded mode has nothing: the oldest waiting goes first
    clock.now += 10  # every mode past max_wait: still the oldest first
    assert q.next("c").mode == "b"


def test_max_wait_0_is_first_come_first_served_between_modes():
    clock = Clock()
    q = queue(clock, max_wait=0.0)
    a, b = job(1, "x"), job(2, "y")
    q.append(a)
    clock.now += 0.001
    q.append(b)
    assert q.next("y") is a


def test_a_switch_is_a_barrier_the_policy_never_crosses():
    clock = Clock()
    q = queue(clock)
    before, barrier, after = job(1, "x"), switch("y"), job(2, "y")
    for item in (before, barrier, after):
        q.append(item)
    assert q.next("y") is before  # y is loaded, but the y job came after the barrier
    q.take(before)
    assert q.next("y") is barrier
    q.take(barrier)
    assert q.next("y") is after


def test_a_job_that_names_no_mode_takes_the_mode_that_would_be_in_force():
    q = queue(Clock())
    a = job(1)
    q.append(a, mode_in_force="x")
    named, after_named = job(2, "y"), job(3)
    q.append(named)
    q.append(after_named, mode_in_force="x")
    barrier, after_switch = switch("z"), job(4)
    q.append(barrier)
    q.append(after_switch, mode_in_force="x")
    assert (a.mode, after_named.mode, after_switch.mode) == ("x", "y", "z")
    empty = queue(Clock())
    nothing = job(5)
    empty.append(nothing, mode_in_force=None)
    assert nothing.mode is None and empty.next("x") is nothing  # NoModeLoaded, at once


def test_put_back_keeps_the_order_and_the_age():
    clock = Clock()
    q = queue(clock)
    first, second = job(1, "x"), job(2, "x")
    q.append(first)
    q.append(second)
    q.take(first)
    q.take(second)
    clock.now += 5
    q.append(job(9, "x"))
    q.put_back([first, second])
    assert [item.id for item in q] == [1, 2, 9] and q.waiting()["x"] == {"jobs": 3, "oldest_s": 5.0}


def test_a_run_for_a_batch_takes_the_same_task_behind_the_head_in_order():
    q = queue(Clock())
    jobs = [job(n, "x") for n in range(1, 6)]
    jobs[3].task = "other"
    for item in jobs:
        q.append(item)
    jobs[1].future.cancel()
    assert [j.id for j in q.run_of(jobs[0], "echo", 8, 1000)] == [1, 3]  # stops at another task: order kept
    assert [j.id for j in q.run_of(jobs[0], "echo", 1, 1000)] == [1]
    for taken in q.run_of(jobs[0], "echo", 8, 1000):
        q.take(taken)
    assert q.next("x").id == 4


def test_failing_stops_at_the_first_barrier():
    q = queue(Clock())
    before, barrier, after = job(1, "x"), switch("y"), job(2, "x")
    for item in (before, barrier, after):
        q.append(item)
    error = GpuvisorError("no")
    failed = q.fail_before_barrier(lambda j: error if j.mode == "x" else None)
    assert failed == [(before.future, None, error)]
    assert list(q) == [barrier, after]


def test_a_barrier_is_an_explicit_switch_and_all_in_reads_modes():
    q = queue(Clock())
    q.append(job(1, "x"))
    q.append(switch("x", explicit=False))
    assert not q.barrier_queued()
    q.append(switch("x"))
    assert q.barrier_queued()
    assert q.all_in("x") and not q.all_in("y")
    q.append(job(2, "y"))
    assert not q.all_in("x")


def test_drop_cancelled_and_take_all():
    q = queue(Clock())
    a, b = job(1, "x"), job(2, "x")
    q.append(a)
    q.append(b)
    a.future.cancel()
    q.drop_cancelled()
    assert list(q) == [b]
    assert q.take_all() == [b] and not q


# ---------------------------------------------------------------- the budget


def budget(clock: Clock, **settings) -> RestartBudget:
    config = SimpleNamespace(max_restarts=3, restart_window=60.0, restart_backoff=0.5, restart_backoff_max=2.0,
                             broken_retry_s=30.0, broken_retry_max_s=100.0)  # fmt: skip
    config.__dict__.update(settings)
    return RestartBudget(config, clock, mode="m")


def test_the_first_death_respawns_at_once_then_the_wait_doubles_up_to_its_cap():
    clock = Clock()
    b = budget(clock)
    waits = []
    for _ in range(3):
        assert not b.count("died")
        waits.append(b.respawn_at - clock.now)
    assert waits == [0.0, 0.5, 1.0]
    assert b.backing_off()
    clock.now += 1.0
    assert not b.backing_off()


def test_one_death_too_many_in_the_window_fails_and_says_why():
    clock = Clock()
    b = budget(clock, max_restarts=2)
    assert not b.count("one") and not b.count("two")
    assert b.count("three")
    assert b.failed == "3 failures in 60s (max_restarts=2); the last: three; tried again in 30s"
    assert b.broken() and b.retry_in() == 30.0


def test_deaths_older_than_the_window_are_forgotten():
    clock = Clock()
    b = budget(clock, max_restarts=1)
    assert not b.count("old")
    clock.now += 61
    assert not b.count("new")  # the old one left the window


def test_a_broken_mode_is_due_for_a_retry_and_a_failed_trial_breaks_it_again_for_longer():
    clock = Clock()
    b = budget(clock, max_restarts=0)
    assert b.count("first")
    clock.now += 29.9
    assert b.broken()
    clock.now += 0.1
    assert not b.broken() and b.failed is not None  # half-open: the next job tries it once
    assert b.count("the trial failed")
    assert b.failed.startswith("it failed again when tried: the trial failed; tried again in 60s")
    clock.now += 60
    assert b.count("again") and b.retry_in() == 100.0  # doubled, up to broken_retry_max_s
    clock.now += 100
    assert b.count("and again") and b.retry_in() == 100.0


def test_a_trial_that_loads_closes_the_breaker_and_a_quiet_window_forgives():
    clock = Clock()
    b = budget(clock, max_restarts=0)
    assert b.count("first")
    clock.now += 30
    b.served()
    assert b.failed is None and not b.broken()
    clock.now += 1
    assert b.count("soon after") and b.retry_in() == 60.0, "broken again soon after it came back: longer"
    clock.now += 60
    b.served()
    clock.now += 60 + 60 + 1  # a whole window past the last wait, with no failure
    assert b.count("much later") and b.retry_in() == 30.0, "forgiven: the first wait again"


def test_broken_retry_s_zero_waits_for_an_operator():
    clock = Clock()
    b = budget(clock, max_restarts=0, broken_retry_s=0.0)
    assert b.count("died")
    assert b.failed.endswith("broken until restart() or switch_mode()") and b.retry_in() is None
    clock.now += 10_000
    assert b.broken()
    b.reset()
    assert not b.broken()


def test_reset_is_a_fresh_budget():
    clock = Clock()
    b = budget(clock, max_restarts=0)
    assert b.count("died")
    b.reset()
    assert b.failed is None and not b.backing_off()
    assert b.count("again")  # max_restarts 0: the first death is one too many


# ---------------------------------------------------------------- the deadlines


def test_next_and_due_read_the_same_table():
    clock = Clock()
    d = Deadlines(clock)
    assert d.next() is None and d.wait(1.0) == 1.0
    d.after((Deadline.JOB, 0), 5)
    d.after(Deadline.DRAIN, 2)
    assert d.next() == clock.now + 2 and d.wait(10.0) == 2.0 and d.wait(1.0) == 1.0
    clock.now += 3
    assert d.due() == [Deadline.DRAIN] and d.wait(1.0) == 0.0
    clock.now += 3
    assert d.due() == [Deadline.DRAIN, (Deadline.JOB, 0)]  # earliest first; they stay until cleared
    d.clear(Deadline.DRAIN)
    d.set((Deadline.JOB, 0), None)
    assert d.due() == [] and d.next() is None


def test_setting_a_name_again_moves_it():
    clock = Clock()
    d = Deadlines(clock)
    d.after("x", 1)
    d.after("x", 10)
    clock.now += 5
    assert d.due() == [] and "x" in d


@pytest.mark.parametrize("n", [0, 1, 5])
def test_put_back_of_any_length_keeps_order(n):
    q = queue(Clock())
    q.append(job(100, "x"))
    q.put_back([job(i, "x") for i in range(n)])
    assert [item.id for item in q] == [*range(n), 100]
