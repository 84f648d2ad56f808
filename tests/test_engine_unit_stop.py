"""How the engine stops work and workers, stepped by hand against a fake
world (no process, no socket, no real time): shutdown with and without a
drain, a drain that runs out of time, a worker deaf to SIGTERM, idle unload
and an operator's unload. Each asserts what a real-process test asserts
(test_supervisor.py, test_engine_scripted.py, test_devices_adversarial.py,
test_unload_reload.py), the deadlines reached by moving the clock."""

from __future__ import annotations

import signal

import pytest

from protocol import Drain, JobCancelled, ShuttingDown
from tests.helpers.fake_world import FakeWorld
from tests.helpers.world_steps import answer_all, loaded, payloads

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- shutdown


def test_shutdown_with_drain_runs_every_queued_job_in_order_then_drains_the_worker():
    with FakeWorld() as world:
        loaded(world, "m")
        futures = [world.submit("echo", i) for i in range(10)]
        stopped = world.shutdown()
        assert world.status["state"] == "draining" and not stopped.done()
        answer_all(world)
        assert [f.result(0) for f in futures] == list(range(10))
        assert isinstance(world.sent()[-1], Drain), "DRAIN once nothing is left"
        assert world.worker().signals == [], "a draining worker exits by itself"
        world.exit_worker(code=0)
        assert world.engine.finished()
        world.close()
        assert stopped.result(0) is None and world.engine.status["state"] == "stopped"


def test_new_work_during_and_after_a_shutdown_gets_shutting_down():
    with FakeWorld() as world:
        loaded(world, "m")
        running = world.submit("echo", "running")
        world.shutdown()
        refused = [world.submit("echo", 1), world.switch("m"), world.restart()]
        assert all(isinstance(world.outcome(f), ShuttingDown) for f in refused)
        world.finish_job(value="running")
        assert running.result(0) == "running"
        second = world.shutdown()  # a second shutdown is harmless
        world.exit_worker(code=0)
        world.close()
        assert second.result(0) is None


def test_a_drain_respawns_the_mode_to_finish_the_queue_after_a_death():
    with FakeWorld() as world:
        loaded(world, "m")
        victim = world.submit("echo", "victim")
        behind = [world.submit("echo", i) for i in range(3)]
        world.shutdown()
        world.kill_worker()
        world.advance(0.5)
        assert "SIGKILL" in world.outcome(victim).message
        world.worker_says_ready()
        answer_all(world)
        assert [f.result(0) for f in behind] == [0, 1, 2]
        world.exit_worker(code=0)
        assert world.engine.finished()


def test_shutdown_without_drain_cancels_the_queue_and_the_job_in_flight_and_stops_the_worker():
    with FakeWorld() as world:
        loaded(world, "m")
        worker = world.worker()
        running = world.submit("echo", "running")
        queued = [world.submit("echo", i) for i in range(5)]
        world.shutdown(drain=False)
        for f in [running, *queued]:
            error = world.outcome(f)
            assert isinstance(error, JobCancelled) and "cancelled by shutdown(drain=False)" in error.message
        assert worker.signals == [signal.SIGTERM]
        world.step()
        assert world.engine.finished()


def test_shutdown_without_drain_cancels_every_devices_work_and_a_switch_under_way_once():
    with FakeWorld({"a": "fake:a", "b": "fake:b", "c": "fake:c"}, devices=["cpu"] * 3) as world:
        loaded(world, "a", "cpu:0")
        loaded(world, "b", "cpu:1")
        running = [world.submit("work", m, mode=m) for m in "ab"]
        switched = world.switch("c", device="cpu:2")
        queued = [world.submit("work", m, mode=m) for m in "abc" * 2]
        every = [*running, switched, *queued]
        outcomes: list = []
        for f in every:
            f.add_done_callback(outcomes.append)
        world.shutdown(drain=False)
        assert len(outcomes) == len(every), "each exactly once"
        assert all(isinstance(world.outcome(f), JobCancelled) for f in every)
        world.step()
        assert world.engine.finished() and not any(p.alive for p in world.processes.started)


def test_a_drain_that_runs_out_of_time_cancels_what_is_left():
    with FakeWorld() as world:
        loaded(world, "m")
        slow = world.submit("echo", "slow")
        behind = world.submit("echo", "behind")
        world.shutdown(timeout=0.5)
        world.advance(0.49)
        assert not slow.done() and not behind.done()
        world.advance(0.02)
        for f in (slow, behind):
            error = world.outcome(f)
            assert isinstance(error, JobCancelled) and "drain timeout" in error.message
        world.step()
        assert world.engine.finished()


def test_the_tightest_shutdown_timeout_wins():
    with FakeWorld() as world:
        loaded(world, "m")
        slow = world.submit("echo", "slow")
        patient = world.shutdown(timeout=30.0)
        world.advance(1.0)
        hurried = world.shutdown(timeout=0.5)
        world.advance(0.6)
        assert isinstance(world.outcome(slow), JobCancelled)
        world.step()
        world.close()
        assert patient.result(0) is None and hurried.result(0) is None


def test_a_worker_that_does_not_exit_after_drain_is_stopped_after_stop_timeout():
    with FakeWorld(stop_timeout=2.0) as world:
        loaded(world, "m")
        worker = world.worker()
        worker.deaf = True
        world.shutdown()
        assert isinstance(world.sent()[-1], Drain)
        world.advance(1.9)
        assert worker.alive and worker.signals == []
        world.advance(0.2)  # DRAIN's exit deadline: SIGTERM, which it ignores
        assert worker.signals == [signal.SIGTERM] and worker.alive
        world.advance(2.1)  # then SIGKILL
        assert worker.signals == [signal.SIGTERM, signal.SIGKILL] and not worker.alive
        world.step()
        assert world.engine.finished()


def test_while_a_worker_ignores_sigterm_commands_are_taken_and_sigkill_follows_at_stop_timeout():
    """Stopping is a state with a deadline, not a wait."""
    with FakeWorld(stop_timeout=2.0) as world:
        loaded(world, "m")
        first = world.worker()
        first.deaf = True
        switched = world.switch("n")
        assert world.device()["worker_state"] == "stopping"
        queued = world.submit("echo", "taken while stopping")
        assert world.status["queued"] == 1 and first.alive
        world.advance(2.0)
        assert first.signals == [signal.SIGTERM, signal.SIGKILL] and not first.alive
        world.step()
        world.worker_says_ready()
        assert switched.result(0)["stop_seconds"] >= 2.0
        world.finish_job(value="taken while stopping")
        assert queued.result(0) == "taken while stopping"


# ---------------------------------------------------------------- unload


def test_idle_unload_stops_an_idle_worker_and_the_next_job_loads_its_mode_again():
    with FakeWorld(idle_unload_s=5.0, heartbeat_timeout=60.0) as world:
        loaded(world, "m")
        job = world.submit("echo", "keeps it")
        world.advance(10.0)  # a running job is never idle
        world.finish_job(value="keeps it")
        worker = world.worker()
        world.advance(4.9)
        assert worker.alive
        world.advance(0.2)
        world.step()
        assert not worker.alive and world.status["idle_unloaded"] == "m" and world.status["worker_pid"] is None
        assert world.status["restarts"] == 0 and job.done()
        again = world.submit("echo", "again")  # no mode named: the one in force loads again
        world.worker_says_ready()
        world.finish_job(value="again")
        assert again.result(0) == "again" and world.status["idle_unloaded"] is None


def test_unload_waits_for_the_job_in_flight_then_frees_the_device_until_the_next_job():
    with FakeWorld() as world:
        loaded(world, "m")
        worker = world.worker()
        running = world.submit("echo", "running")
        queued = world.submit("echo", "queued")
        unloaded = world.unload("cpu")
        assert not unloaded.done() and worker.signals == []
        world.finish_job(value="running")
        assert running.result(0) == "running"
        assert worker.signals == [signal.SIGTERM] and payloads(world) == ["running"], "queued jobs stay queued"
        world.step()
        assert unloaded.result(0) == {"device": "cpu", "mode": "m", "pid": worker.pid}
        assert world.worker() is not worker and world.status["restarts"] == 0, "the queued job loads m again"
        world.worker_says_ready()
        world.finish_job(value="queued")
        assert queued.result(0) == "queued"
        fresh = world.worker()
        world.unload("cpu")
        world.step()
        assert world.status["idle_unloaded"] == "m" and world.status["worker_pid"] is None and not fresh.alive


def test_unload_of_a_device_that_holds_nothing_answers_none():
    with FakeWorld() as world:
        assert world.unload("cpu").result(0) is None
        loaded(world, "m")
        world.unload("cpu")
        world.step()
        assert world.unload("cpu").result(0) is None
