"""The engine stepped by hand against a fake world (tests/helpers/fake_world.py):
no process, no socket, no real time. Each test runs in milliseconds."""

from __future__ import annotations

import signal

import pytest

from protocol import Drain, Job, Load, WorkerCrashed
from tests.helpers.fake_world import FakeWorld

pytestmark = pytest.mark.unit


@pytest.fixture
def world():
    with FakeWorld() as w:
        yield w


def test_a_switch_spawns_a_worker_sends_it_its_mode_and_answers_once_it_is_ready(world):
    switched = world.switch("m")
    assert world.device()["worker_state"] == "spawned" and not switched.done()
    world.worker_says_hello()
    assert isinstance(world.sent()[0], Load) and world.sent()[0].mode == "m"
    assert world.device()["worker_state"] == "loading"
    world.worker_says_ready()
    result = switched.result(0)
    assert result["status"] == "loaded" and result["mode"] == "m" and result["pid"] == world.worker().pid
    assert world.status["mode"] == "m" and world.status["worker_state"] == "ready"


def test_a_job_goes_to_the_worker_and_its_result_to_the_caller(world):
    world.switch("m")
    world.worker_says_ready()
    job = world.submit("echo", {"x": 1})
    sent = world.sent()[-1]
    assert isinstance(sent, Job) and sent.task == "echo" and sent.payload == {"x": 1}
    assert world.status["in_flight"] == 1 and not job.done()
    world.finish_job(value={"x": 1})
    assert job.result(0) == {"x": 1}
    assert world.status["jobs_done"] == 1 and world.status["in_flight"] == 0


def test_a_second_switch_stops_the_worker_and_starts_one_in_the_new_mode(world):
    world.switch("m")
    world.worker_says_ready()
    first = world.worker()
    switched = world.switch("n")
    assert first.signals == [signal.SIGTERM] and world.device()["switching_to"] == "n"
    world.step()  # reaped: the new worker starts
    assert world.worker().gen == first.gen + 1 and world.device()["worker_state"] == "spawned"
    world.worker_says_ready()
    assert switched.result(0)["previous"] == "m" and world.worker().gen == first.gen + 1


def test_a_death_mid_job_retries_a_job_that_may_run_again_then_fails_one_that_may_not(world):
    world.switch("m")
    world.worker_says_ready()
    again = world.submit("echo", 1, retries=1)
    once = world.submit("echo", 2)
    world.kill_worker()
    world.advance(0.1)  # its last words: none came
    assert world.status["restarts"] == 1 and not again.done()
    world.worker_says_ready()  # respawned for the job that runs again
    world.finish_job(value=1)
    assert again.result(0) == 1
    world.kill_worker()
    world.advance(0.1)
    error = world.outcome(once)
    assert isinstance(error, WorkerCrashed) and "SIGKILL" in error.message


def test_a_job_past_its_timeout_kills_the_worker_at_the_deadline(world):
    world.switch("m")
    world.worker_says_ready()
    job = world.submit("echo", 1, timeout=2.0)
    proc = world.worker()
    world.advance(1.9)
    assert proc.alive and not job.done()
    world.advance(0.2)
    assert not proc.alive
    world.step()  # reaped; its last words are awaited a moment
    world.advance(0.1)
    assert type(world.outcome(job)).__name__ == "JobTimeout"


def test_shutdown_drains_the_worker_and_the_engine_finishes(world):
    world.switch("m")
    world.worker_says_ready()
    stopped = world.shutdown()
    assert isinstance(world.sent()[-1], Drain)
    world.exit_worker(code=0)
    assert world.engine.finished()
    world.close()
    assert stopped.result(0) is None
