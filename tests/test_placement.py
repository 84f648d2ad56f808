"""Placement's rules on their own (supervisor/engine/placement.py): pure
functions over views of the devices, the queue and the config, in
microseconds. The first eight cases are the placement bugs found with
three real CPU workers (tests/test_devices_adversarial.py), each as the
rule that decides it."""

from __future__ import annotations

import random
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest

from supervisor.config import Config, parse
from supervisor.engine import placement
from supervisor.engine.commands import QueuedJob, QueuedSwitch
from supervisor.engine.placement import Move
from supervisor.engine.queue import JobQueue
from supervisor.futures import JobFuture
from tests.helpers.config import config_text

pytestmark = pytest.mark.unit


@dataclass
class Breakers:
    broken_modes: set[str] = field(default_factory=set)

    def broken(self, mode: str | None) -> bool:
        return mode in self.broken_modes


@dataclass(eq=False)
class View:
    """A device as placement sees it."""

    name: str
    mode: str | None = None
    switching_to: str | None = None
    mode_since: float = 0.0
    free_since: float = 0.0
    running: int = 0
    failed: str | None = None
    refused: dict[str, float] = field(default_factory=dict)
    breakers: Breakers = field(default_factory=Breakers)

    @property
    def mode_ahead(self) -> str | None:
        return self.switching_to or self.mode

    def busy(self) -> bool:
        return self.switching_to is not None or self.running > 0

    def failed_reason(self) -> str | None:
        return self.failed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def config(modes: dict) -> Config:
    return parse(config_text(modes, supervisor={"devices": ["cpu", "cpu", "cpu"], "warm_standby": False}))


def three(**modes: str | None) -> list[View]:
    """cpu:0, cpu:1, cpu:2 holding the modes given by name (c0="a")."""
    return [View(f"cpu:{n}", mode=modes.get(f"c{n}"), free_since=float(n)) for n in range(3)]


def job(n: int, mode: str | None) -> QueuedJob:
    return QueuedJob(n, "work", [b""], mode, None, JobFuture())


def switch(mode: str | None, device: str | None = None, restart: bool = False) -> QueuedSwitch:
    return QueuedSwitch(mode, Future(), restart=restart, device=device)


def move(device: View, item, target: str | None = None) -> Move:
    worker_mode = device.mode if device.switching_to is None else None
    return placement.move(device, item, target=target, worker_mode=worker_mode, in_flight=device.running,
                          backing_off=lambda mode: False)  # fmt: skip


MODES = {m: f"x.{m}:load" for m in "abc"}


# ------------------------------------------------------------------ restart()


def test_restart_of_no_mode_restarts_the_mode_in_force_where_it_is_held():
    devices = three(c1="a")
    devices[1].mode_since = 5.0
    assert placement.switch_target(config(MODES), devices, switch(None, restart=True)) == "cpu:1"


def test_restart_of_a_held_mode_restarts_it_on_its_device_not_on_another():
    devices = three(c2="a", c0="b")
    assert placement.switch_target(config(MODES), devices, switch("a", restart=True)) == "cpu:2"
    assert placement.switch_target(config(MODES), devices, switch("a")) == "cpu:2", "a switch to it: a no-op there"


# ------------------------------------------------------------------ jobs that name no mode


def test_a_job_naming_no_mode_after_switch_mode_to_a_mode_already_held_runs_in_it():
    devices = three(c0="a", c1="b")
    devices[0].mode_since, devices[1].mode_since = 1.0, 2.0
    assert placement.mode_in_force(devices) == "b", "the mode most recently put in force"
    devices[0].mode_since = 3.0  # switch_mode("a") answered already_loaded: the caller's word puts a in force
    assert placement.mode_in_force(devices) == "a"
    q = JobQueue(clock=Clock())
    unnamed = job(1, None)
    q.append(unnamed, mode_in_force=placement.mode_in_force(devices))
    assert unnamed.mode == "a"


def test_a_crash_on_another_device_does_not_change_the_mode_of_jobs_naming_none():
    devices = three(c0="a", c1="b")
    devices[0].mode_since, devices[1].mode_since = 1.0, 2.0
    respawn = QueuedSwitch("a", None)  # the implicit switch that brings a back on cpu:0 after its death
    assert not placement.puts_in_force(respawn, devices[0])
    assert placement.puts_in_force(switch("a"), devices[0]), "an explicit switch does"
    assert placement.puts_in_force(QueuedSwitch("c", None), devices[0]), "so does a switch to a new mode"
    assert placement.mode_in_force(devices) == "b"


def test_jobs_naming_no_mode_follow_the_callers_switches_across_devices():
    devices = three()
    q = JobQueue(clock=Clock())
    plan = [switch("a", "cpu:2"), job(1, None), job(2, None), switch("b", "cpu:0"), job(3, None), job(4, "c"),
            job(5, None), switch("a"), job(6, None), switch("b", "cpu:1"), job(7, None)]  # fmt: skip
    for item in plan:
        q.append(item, mode_in_force=placement.mode_in_force(devices))
    assert [item.mode for item in plan if isinstance(item, QueuedJob)] == ["a", "a", "b", "c", "c", "a", "b"]


# ------------------------------------------------------------------ barriers


def test_a_barrier_for_one_device_waits_for_jobs_before_it_that_only_another_may_run():
    cfg = config({"a": {"loader": "x.a:load", "devices": ["cpu:0"]}, "b": "x.b:load", "c": "x.c:load"})
    devices = three(c0="a")
    devices[0].running = 1  # the first a job runs on cpu:0
    q = JobQueue(clock=Clock())
    second, barrier, after = job(2, "a"), switch("b", "cpu:1"), job(3, "c")
    for item in (second, barrier, after):
        q.append(item)
    for device in devices[1:]:  # the devices that may not run a: nothing behind the barrier reaches them
        assert not placement.may_run(cfg, devices, device, "a", 0.0)
        offered = q.next(device.mode, 0.0, lambda mode, d=device: placement.may_run(cfg, devices, d, mode, 0.0))
        assert offered is None, f"{device.name} was offered {offered}"
    assert q.next("a", 0.0) is second  # cpu:0, once free, takes it; then the barrier heads the queue
    q.take(second)
    assert q.next(None, 0.0) is barrier
    assert move(devices[2], barrier, target="cpu:1") is Move.WAIT, "a barrier for cpu:1 holds back cpu:2"
    assert move(devices[1], barrier, target="cpu:1") is Move.BEGIN_BARRIER


def test_switch_mode_of_a_busy_device_waits_for_its_job_and_holds_back_the_jobs_after_it():
    devices = three(c1="a")
    devices[1].running = 1
    barrier = switch("b", "cpu:1")
    assert placement.switch_target(config(MODES), devices, barrier) == "cpu:1"
    assert move(devices[1], barrier, target="cpu:1") is Move.WAIT, "after the job it runs"
    for device in (devices[0], devices[2]):
        assert move(device, barrier, target="cpu:1") is Move.WAIT, "nothing behind the barrier runs elsewhere"
    devices[1].running = 0
    assert move(devices[1], barrier, target="cpu:1") is Move.BEGIN_BARRIER


def test_mixed_callers_with_barriers_keep_order_per_mode_and_nothing_overtakes_a_barrier():
    """Jobs of four modes (one replica each) and switches from three
    callers, placed on three devices by the rules alone, each device
    switching at once when told: every job runs in its mode, a mode's jobs
    keep their order, and no job queued after a barrier is placed before
    it."""
    cfg = config({**{m: f"x.{m}:load" for m in "abcd"}, "s": {"loader": "x.s:load", "replicas": 3}})
    rng = random.Random(1515)
    clock = Clock()
    q = JobQueue(max_wait=lambda mode: 0.2, clock=clock)
    devices = three()
    items: list = []
    for i in range(108):
        if i % 18 == 17:
            target = rng.choice("abcds")
            items.append(switch(target, rng.choice(["cpu:0", "cpu:1", "cpu:2"]) if target == "s" else None))
        else:
            items.append(job(i, rng.choice("abcd")))
        q.append(items[-1], mode_in_force=placement.mode_in_force(devices))
        clock.now += 0.01
    placed: list = []
    for _ in range(10_000):
        if not q:
            break
        clock.now += 0.05
        for device in placement.offer_order(devices):
            item = q.next(device.mode, 0.0, lambda m, d=device: placement.may_run(cfg, devices, d, m, clock.now))
            if item is None:
                continue
            target = None
            if isinstance(item, QueuedSwitch):
                target = item.device = placement.switch_target(cfg, devices, item)
            decided = move(device, item, target)
            if decided is Move.WAIT:
                continue
            q.take(item)
            if decided is Move.BEGIN_BARRIER or decided is Move.SWITCH_FOR_JOB:
                device.mode, device.mode_since = item.mode, clock.now
            if isinstance(item, QueuedJob):
                if device.mode != item.mode:
                    device.mode, device.mode_since = item.mode, clock.now
                placed.append((item, device.mode))
            else:
                placed.append((item, None))
    assert not q, "the rules left work in the queue"
    order = [item for item, _ in placed]
    assert all(ran == item.mode for item, ran in placed if isinstance(item, QueuedJob)), "a job ran in another mode"
    for m in "abcd":
        ids = [item.id for item in order if isinstance(item, QueuedJob) and item.mode == m]
        assert ids == sorted(ids), f"jobs of {m} ran out of order"
    for k, item in enumerate(items):
        if isinstance(item, QueuedSwitch):
            at = order.index(item)
            assert all(order.index(j) > at for j in items[k + 1 :]), f"an item queued after barrier {k} overtook it"
