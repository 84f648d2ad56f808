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


def test_the_queue_is_first_in_first_out_and_drops_cancelled_items_as_they_surface():
    q = JobQueue()
    a, b, c = job(1), job(2), job(3)
    for item in (a, b, c):
        q.append(item)
    assert q.next() is a
    q.take(a)
    assert b.future.cancel()
    assert q.next() is c and len(q) == 1


def test_put_back_keeps_the_order_at_the_head():
    q = JobQueue()
    later = job(9)
    q.append(later)
    first, second = job(1), job(2)
    q.put_back([first, second])
    assert [item.id for item in q] == [1, 2, 9]


def test_take_removes_an_item_from_anywhere():
    q = JobQueue()
    a, b = job(1), job(2)
    q.append(a)
    q.append(b)
    q.take(b)
    assert list(q) == [a]


def test_failing_stops_at_the_first_barrier():
    q = JobQueue()
    before, barrier, after = job(1, "x"), switch("y"), job(2, "x")
    for item in (before, barrier, after):
        q.append(item)
    error = GpuvisorError("no")
    failed = q.fail_before_barrier(lambda j: error if j.mode == "x" else None)
    assert failed == [(before.future, None, error)]
    assert list(q) == [barrier, after]


def test_a_barrier_is_an_explicit_switch_and_all_in_reads_modes():
    q = JobQueue()
    q.append(job(1))
    q.append(switch("x", explicit=False))
    assert not q.barrier_queued()
    q.append(switch("x"))
    assert q.barrier_queued()
    assert q.all_in("x") and not q.all_in("y")
    q.append(job(2, "y"))
    assert not q.all_in("x")


def test_drop_cancelled_and_take_all():
    q = JobQueue()
    a, b = job(1), job(2)
    q.append(a)
    q.append(b)
    a.future.cancel()
    q.drop_cancelled()
    assert list(q) == [b]
    assert q.take_all() == [b] and not q


# ---------------------------------------------------------------- the budget


def budget(clock: Clock, **settings) -> RestartBudget:
    config = SimpleNamespace(max_restarts=3, restart_window=60.0, restart_backoff=0.5, restart_backoff_max=2.0)
    config.__dict__.update(settings)
    return RestartBudget(config, clock)


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
    assert "3 worker deaths in 60s (max_restarts=2); the last: three" in b.failed


def test_deaths_older_than_the_window_are_forgotten():
    clock = Clock()
    b = budget(clock, max_restarts=1)
    assert not b.count("old")
    clock.now += 61
    assert not b.count("new")  # the old one left the window


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
    q = JobQueue()
    q.append(job(100))
    q.put_back([job(i) for i in range(n)])
    assert [item.id for item in q] == [*range(n), 100]
