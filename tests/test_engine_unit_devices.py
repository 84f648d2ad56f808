"""Several devices under one engine, stepped by hand against a fake world
(no process, no socket, no real time): where work is placed, the replicas
and devices a mode allows, a death or a spent budget on one device, and
restarts and switches that name a device. Each asserts what a real-process
test asserts (test_devices.py, test_devices_adversarial.py) with three
CPU device slots, here turn by turn."""

from __future__ import annotations

import signal

import pytest

from protocol import WorkerCrashed
from tests.helpers.fake_world import LAST_WORDS_MAX_S, FakeWorld
from tests.helpers.world_steps import answer_all, loaded, payloads

pytestmark = pytest.mark.unit

THREE = ["cpu", "cpu", "cpu"]
NAMES = ["cpu:0", "cpu:1", "cpu:2"]


def modes(*names: str, **more: dict) -> dict:
    """Modes of those names, each with the extra keys ``more`` gives it."""
    return {name: {"loader": f"fake:{name}", **more.get(name, {})} for name in names}


def holding(world: FakeWorld, mode: str) -> list[str]:
    """The devices whose worker holds ``mode`` (or is switching to it)."""
    return [d["name"] for d in world.status["devices"] if mode in (d["mode"], d["switching_to"])]


def starting(world: FakeWorld) -> list[str]:
    """The devices whose worker has just been spawned and waits to load."""
    return [d["name"] for d in world.status["devices"] if d["worker_state"] == "spawned"]


def test_each_device_has_a_worker_of_its_own_and_modes_spread_over_the_free_ones():
    with FakeWorld(modes("a", "b", "c"), devices=THREE) as world:
        assert [d["name"] for d in world.status["devices"]] == NAMES
        jobs = {m: world.submit("work", m, mode=m) for m in "abc"}
        assert sorted(starting(world)) == NAMES, "three modes, three free devices: one each"
        for name in NAMES:
            world.worker_says_ready(name)
            answer_all(world, name)
        assert {m: f.result(0) for m, f in jobs.items()} == {"a": "a", "b": "b", "c": "c"}
        assert sorted(holding(world, m)[0] for m in "abc") == NAMES
        assert len({world.worker(name).pid for name in NAMES}) == 3


def test_a_mode_is_held_by_at_most_replicas_devices():
    with FakeWorld(modes("busy", "solo", busy={"replicas": 3}), devices=THREE) as world:
        busy = [world.submit("work", i, mode="busy") for i in range(9)]
        assert sorted(holding(world, "busy")) == NAMES, "nine jobs for a mode of three replicas: three workers"
        for name in NAMES:
            world.worker_says_ready(name)
        assert sum(d["in_flight"] for d in world.status["devices"]) == 3
        for name in NAMES:
            answer_all(world, name)
        assert all(f.done() for f in busy)
        solo = [world.submit("work", i, mode="solo") for i in range(6)]
        assert len(holding(world, "solo")) == 1, "one replica, however many of its jobs wait"
        device = holding(world, "solo")[0]
        world.worker_says_ready(device)
        answer_all(world, device)
        assert [f.result(0) for f in solo] == list(range(6)) and payloads(world, device) == list(range(6))


def test_a_mode_that_names_its_devices_runs_there_and_nowhere_else():
    with FakeWorld(modes("a", "rare", rare={"devices": ["cpu:2"]}), devices=THREE) as world:
        loaded(world, "a", "cpu:2")  # the device it names holds another mode: it is switched
        job = world.submit("work", "rare", mode="rare")
        assert holding(world, "rare") == ["cpu:2"]
        world.step()  # the worker of a, stopped, is reaped
        assert starting(world) == ["cpu:2"]
        world.worker_says_ready("cpu:2")
        world.finish_job("cpu:2", value="rare")
        assert job.result(0) == "rare" and world.device("cpu:0")["worker_pid"] is None


def test_a_death_on_one_device_leaves_the_others_jobs_alone():
    with FakeWorld(modes("a", "b", "c"), devices=THREE) as world:
        for m, name in zip("abc", NAMES, strict=True):
            loaded(world, m, name)
        long = {m: world.submit("work", m, mode=m) for m in "abc"}
        others = {name: world.worker(name) for name in ("cpu:0", "cpu:2")}
        world.kill_worker("cpu:1")
        world.advance(LAST_WORDS_MAX_S)
        error = world.outcome(long["b"])
        assert isinstance(error, WorkerCrashed) and "SIGKILL" in error.message
        world.finish_job("cpu:0", value="a")
        world.finish_job("cpu:2", value="c")
        assert long["a"].result(0) == "a" and long["c"].result(0) == "c"
        assert all(w.alive and w.signals == [] for w in others.values()), "the other workers never noticed"
        assert [d["restarts"] for d in world.status["devices"]] == [0, 1, 0]
        again = world.submit("work", "b again", mode="b")
        assert starting(world) == ["cpu:1"], "the mode comes back on its device"
        world.worker_says_ready("cpu:1")
        world.finish_job("cpu:1", value="b again")
        assert again.result(0) == "b again" and world.status["state"] == "running"


def test_switch_mode_names_its_device_or_placement_chooses_and_a_held_mode_is_a_no_op_where_it_is():
    with FakeWorld(modes("a", "b", "pinned", pinned={"devices": ["cpu:1"]}), devices=THREE) as world:
        first = world.switch("a")
        holder = holding(world, "a")
        world.worker_says_ready(holder[0])
        assert first.result(0)["status"] == "loaded" and len(holder) == 1
        again = world.switch("a")
        assert again.result(0) == {"mode": "a", "status": "already_loaded", "pid": world.worker(holder[0]).pid}
        other = next(n for n in NAMES if n != holder[0] and n != "cpu:1")
        named = world.switch("b", device=other)
        world.worker_says_ready(other)
        assert named.result(0)["status"] == "loaded" and holding(world, "b") == [other]
        assert holding(world, "a") == holder, "one device changed"
        pinned = world.switch("pinned")
        world.step()
        world.worker_says_ready("cpu:1")
        assert pinned.result(0)["status"] == "loaded" and holding(world, "pinned") == ["cpu:1"]
        restarted = world.restart(device="cpu:1")
        world.step()
        world.worker_says_ready("cpu:1")
        assert restarted.result(0)["status"] == "restarted" and restarted.result(0)["mode"] == "pinned"


def test_restart_of_a_held_mode_restarts_it_on_its_device_not_on_another():
    with FakeWorld(modes("a", "b"), devices=THREE) as world:
        loaded(world, "a", "cpu:1")
        old = world.worker("cpu:1")
        for restart in (lambda: world.restart("a"), lambda: world.restart()):  # named, then the mode in force
            restarted = restart()
            world.step()
            world.worker_says_ready("cpu:1")
            got = restarted.result(0)
            assert got["status"] == "restarted" and got["mode"] == "a" and holding(world, "a") == ["cpu:1"]
            assert got["pid"] == world.worker("cpu:1").pid != old.pid and not old.alive
            old = world.worker("cpu:1")


def test_a_job_naming_no_mode_runs_in_the_mode_most_recently_put_in_force_on_any_device():
    with FakeWorld(modes("a", "b"), devices=THREE) as world:
        loaded(world, "a", "cpu:0")
        world.advance(0.01)  # "most recently": by the clock, which a fake one must move
        loaded(world, "b", "cpu:1")
        in_b = world.submit("work", "plain")
        assert world.device("cpu:1")["in_flight"] == 1
        world.finish_job("cpu:1", value="b")
        assert in_b.result(0) == "b"
        assert world.switch("a").result(0)["status"] == "already_loaded"
        in_a = world.submit("work", "plain")  # the caller's word: a is in force again
        assert world.device("cpu:0")["in_flight"] == 1
        world.finish_job("cpu:0", value="a")
        assert in_a.result(0) == "a"


def test_a_respawn_on_another_device_puts_nothing_new_in_force():
    with FakeWorld(modes("a", "b"), devices=THREE) as world:
        loaded(world, "a", "cpu:0")
        world.advance(0.01)  # "most recently": by the clock, which a fake one must move
        loaded(world, "b", "cpu:1")
        world.kill_worker("cpu:0")
        respawned = world.submit("work", "a", mode="a")
        world.worker_says_ready("cpu:0")
        world.finish_job("cpu:0", value="a")
        assert respawned.result(0) == "a"
        plain = world.submit("work", "plain")
        assert world.device("cpu:1")["in_flight"] == 1, "b is still the mode in force"
        world.finish_job("cpu:1", value="b")
        assert plain.result(0) == "b"


def test_a_barrier_for_one_device_waits_for_the_jobs_before_it_that_only_another_may_run():
    with FakeWorld(modes("a", "b", "c", a={"devices": ["cpu:0"]}), devices=THREE) as world:
        loaded(world, "a", "cpu:0")
        first = world.submit("work", "a1", mode="a")
        second = world.submit("work", "a2", mode="a")
        switched = world.switch("b", device="cpu:1")
        after = world.submit("work", "c", mode="c")
        assert starting(world) == [] and not switched.done(), "nothing behind the barrier runs before it"
        world.finish_job("cpu:0", value="a1")  # a2 goes to cpu:0: the barrier is at the head
        assert first.done() and payloads(world, "cpu:0") == ["a1", "a2"]
        # The pump offered cpu:1 work before cpu:0 took a2, so the barrier
        # begins at the next turn (in the loop: the next event or deadline).
        world.step()
        assert starting(world) == ["cpu:1", "cpu:2"], "the switch of cpu:1, then c on the free device"
        world.worker_says_ready("cpu:1")
        assert switched.result(0)["status"] == "loaded" and not after.done()
        world.worker_says_ready("cpu:2")
        world.finish_job("cpu:2", value="c")
        world.finish_job("cpu:0", value="a2")
        assert after.result(0) == "c" and second.result(0) == "a2"


def test_a_budget_spent_on_one_device_breaks_the_mode_there_alone_and_it_moves_on():
    with FakeWorld(modes("a", "b", a={"replicas": 1}), devices=["cpu", "cpu"], max_restarts=0) as world:
        loaded(world, "a", "cpu:0")
        world.kill_worker("cpu:0")
        devices = world.status["devices"]
        assert "a" in devices[0]["broken"] and devices[1]["broken"] == {}
        assert world.status["broken_modes"] == {}, "another device may still run it"
        job = world.submit("work", "a", mode="a")
        assert starting(world) == ["cpu:1"]
        world.worker_says_ready("cpu:1")
        world.finish_job("cpu:1", value="a")
        assert job.result(0) == "a"


def test_idle_unload_stops_each_idle_device_and_the_next_job_reloads_its_mode():
    with FakeWorld(modes("a", "b"), devices=["cpu", "cpu"], idle_unload_s=0.3) as world:
        loaded(world, "a", "cpu:0")
        loaded(world, "b", "cpu:1")
        workers = [world.worker(n) for n in ("cpu:0", "cpu:1")]
        world.advance(0.29)
        assert all(w.alive for w in workers)
        world.advance(0.02)
        world.step()
        assert not any(w.alive for w in workers) and [w.signals for w in workers] == [[signal.SIGTERM]] * 2
        assert [d["idle_unloaded"] for d in world.status["devices"]] == ["a", "b"]
        assert world.status["restarts"] == 0, "an idle unload is not a death"
        again = world.submit("work", "a", mode="a")
        world.worker_says_ready("cpu:0")
        world.finish_job("cpu:0", value="a")
        assert again.result(0) == "a" and world.device("cpu:0")["idle_unloaded"] is None


def test_an_idle_device_unloads_while_another_devices_mode_has_a_backlog():
    with FakeWorld(modes("a", "b", a={"idle_unload_s": 0.3}), devices=["cpu", "cpu"]) as world:
        loaded(world, "a", "cpu:0")
        loaded(world, "b", "cpu:1")
        world.submit("work", "running", mode="b")
        [world.submit("work", i, mode="b") for i in range(3)]  # a backlog cpu:0 may not take
        world.advance(0.31)
        world.step()
        assert world.device("cpu:0")["idle_unloaded"] == "a" and world.device("cpu:1")["in_flight"] == 1
