"""Every job gets exactly one outcome whatever its worker does, with the
engine stepped by hand against a fake world (no process, no socket, no real
time): deaths and retries, timeouts, hangs, failed loads, the restart
budget and its breakers, an OOM recycle. Each asserts what a real-process
test asserts (test_faults.py, test_supervisor.py, test_respawn.py,
test_window.py), here exactly, with the budget's clock moved by hand."""

from __future__ import annotations

import signal

import pytest

from protocol import (
    JobFailed,
    JobTimeout,
    ModeBroken,
    ModeLoadError,
    OutOfMemory,
    ProtocolError,
    Result,
    WorkerCrashed,
    encode,
)
from tests.helpers.fake_world import LAST_WORDS_MAX_S, FakeWorld
from tests.helpers.world_steps import answer_all, loaded, payloads

pytestmark = pytest.mark.unit


def dies(world: FakeWorld, sig: signal.Signals = signal.SIGKILL, device: int = 0) -> None:
    """The worker dies by ``sig`` and its end is handled: reaped, then its
    last words waited for (none come)."""
    world.kill_worker(device, sig)
    world.advance(LAST_WORDS_MAX_S)


# ---------------------------------------------------------------- deaths


def test_a_death_while_idle_fails_nothing_and_the_next_job_gets_a_new_worker():
    with FakeWorld() as world:
        loaded(world, "m")
        old = world.worker()
        world.kill_worker()
        assert world.status["restarts"] == 1 and world.status["worker_pid"] is None
        job = world.submit("echo", 1)  # names no mode: the one in force
        world.worker_says_ready()
        world.finish_job(value=1)
        assert job.result(0) == 1 and world.worker().pid != old.pid and world.status["mode"] == "m"


@pytest.mark.parametrize(
    "code, words",
    [(-int(signal.SIGSEGV), "killed by SIGSEGV(-11)"), (7, "exited with code 7"), (0, "exited with code 0")],
)
def test_a_death_mid_job_fails_that_job_with_the_cause_and_leaves_the_queue_alone(code, words):
    with FakeWorld() as world:
        loaded(world, "m")
        pid = world.worker().pid
        victim = world.submit("echo", "victim")
        behind = [world.submit("echo", i) for i in range(5)]
        world.exit_worker(code=code)
        world.advance(LAST_WORDS_MAX_S)
        error = world.outcome(victim)
        assert isinstance(error, WorkerCrashed) and words in error.message and f"pid {pid}" in error.message
        world.worker_says_ready()
        answer_all(world)
        assert [f.result(0) for f in behind] == list(range(5)) and world.status["restarts"] == 1


def test_an_answer_in_a_dead_workers_last_words_is_its_jobs_outcome():
    with FakeWorld() as world:
        loaded(world, "m")
        job = world.submit("echo", "x")
        world.kill_worker()
        assert not job.done(), "its last words may still come"
        world.finish_job(value="said before it died")
        world.advance(LAST_WORDS_MAX_S)
        assert job.result(0) == "said before it died"


def test_a_death_while_a_switch_waits_fails_only_the_job_and_the_switch_goes_through():
    with FakeWorld() as world:
        loaded(world, "m")
        victim = world.submit("echo", "victim")
        switched = world.switch("n")
        after = world.submit("echo", "after")
        dies(world)
        assert isinstance(world.outcome(victim), WorkerCrashed)
        world.worker_says_ready()
        assert switched.result(0)["status"] == "loaded" and world.sent()[0].mode == "n"
        world.finish_job(value="after")
        assert after.result(0) == "after"


def test_a_message_from_an_older_generation_is_dropped():
    with FakeWorld(restart_backoff=0.0) as world:
        loaded(world, "m")
        job = world.submit("echo", 1, retries=1)
        first = world.worker()
        dies(world)
        world.worker_says_ready()
        assert world.jobs_sent() == [job_id := world.running()], "the job runs again on the new worker"
        world.link.deliver(f"g{first.gen}".encode(), encode(Result(job_id, "from the dead")))
        world.step()
        assert not job.done(), "the old worker's answer is not the new one's"
        world.finish_job(value="from the living")
        assert job.result(0) == "from the living"


def test_a_malformed_message_kills_the_worker_and_its_job_gets_a_protocol_error():
    with FakeWorld() as world:
        loaded(world, "m")
        job = world.submit("echo", 1)
        world.says([b"\xc1 not msgpack"])
        world.step()
        world.advance(LAST_WORDS_MAX_S)
        assert isinstance(world.outcome(job), ProtocolError) and world.status["restarts"] == 1


# ---------------------------------------------------------------- retries


def test_an_idempotent_job_runs_again_after_a_death():
    with FakeWorld() as world:
        loaded(world, "m")
        job = world.submit("echo", "again", retries=1)
        dies(world)
        assert not job.done()
        world.worker_says_ready()
        world.finish_job(value="survived")
        assert job.result(0) == "survived" and world.status["restarts"] == 1


def test_retries_run_out_and_then_the_job_fails_and_the_jobs_around_it_run():
    with FakeWorld(restart_backoff=0.0) as world:
        loaded(world, "m")
        before = world.submit("echo", "before")
        job = world.submit("echo", "doomed", retries=2)
        after = world.submit("echo", "after")
        world.finish_job(value="before")
        for _ in range(3):  # one run and two retries
            assert payloads(world)[-1] == "doomed"
            dies(world)
            if not job.done():
                world.worker_says_ready()
        assert isinstance(world.outcome(job), WorkerCrashed) and world.status["restarts"] == 3
        world.worker_says_ready()
        world.finish_job(value="after")
        assert before.result(0) == "before" and after.result(0) == "after"


def test_a_timeout_or_a_handler_error_is_not_retried():
    with FakeWorld() as world:
        loaded(world, "m")
        timed = world.submit("echo", "slow", timeout=0.3, retries=3)
        world.advance(0.4)
        world.step()
        world.advance(LAST_WORDS_MAX_S)
        error = world.outcome(timed)
        assert isinstance(error, JobTimeout) and "ran past its 0.3s timeout" in error.message
        assert world.status["restarts"] == 1
        failing = world.submit("echo", "raises", retries=3)
        world.worker_says_ready()
        world.fail_job(message="it raised on purpose")
        assert isinstance(world.outcome(failing), JobFailed) and world.status["restarts"] == 1
        assert world.worker().alive, "a handler's error leaves the worker serving"


def test_the_configured_job_timeout_applies_when_a_job_names_none_and_0_means_none():
    with FakeWorld(job_timeout=0.3) as world:
        loaded(world, "m")
        stuck = world.submit("echo", "stuck")
        world.advance(0.31)
        world.step()
        world.advance(LAST_WORDS_MAX_S)
        assert "ran past its 0.3s timeout" in world.outcome(stuck).message
        own = world.submit("echo", "own", timeout=30)
        world.worker_says_ready()
        world.advance(5.0)
        world.finish_job(value="own")
        unbounded = world.submit("echo", "none", timeout=0)
        world.advance(500.0)
        world.finish_job(value="none")
        assert own.result(0) == "own" and unbounded.result(0) == "none"


# ---------------------------------------------------------------- hangs and loads


def test_a_worker_that_sends_nothing_for_heartbeat_timeout_is_killed_as_hung():
    with FakeWorld(heartbeat_timeout=10.0) as world:
        loaded(world, "m")
        job = world.submit("echo", 1)
        worker = world.worker()
        for _ in range(5):  # heartbeats keep a long job's worker alive
            world.advance(5.0)
            world.heartbeat()
        assert worker.alive and not job.done()
        world.advance(10.1)
        assert not worker.alive and worker.signals == [signal.SIGKILL]
        world.step()
        world.advance(LAST_WORDS_MAX_S)
        error = world.outcome(job)
        assert isinstance(error, WorkerCrashed) and "hung: no message for" in error.message


def test_a_worker_that_never_says_ready_is_killed_after_load_timeout_and_the_switch_fails():
    with FakeWorld(load_timeout=5.0) as world:
        switched = world.switch("m")
        world.worker_says_hello()
        world.advance(4.9)
        assert not switched.done()
        world.advance(0.2)
        world.step()
        error = world.outcome(switched)
        assert isinstance(error, ModeLoadError) and "did not say READY within load_timeout=5s" in error.message
        assert world.status["worker_pid"] is None and world.status["restarts"] == 0


def test_a_mode_that_fails_to_load_fails_the_switch_and_the_jobs_waiting_for_it_once():
    with FakeWorld() as world:
        loaded(world, "m")
        switched = world.switch("n")
        waiting = [world.submit("echo", i, mode="n") for i in range(3)]
        plain = world.submit("echo", "plain")  # names no mode: it would run in n
        world.step()
        world.worker_fails_to_load(message="RuntimeError: no such model")
        error = world.outcome(switched)
        assert isinstance(error, ModeLoadError) and "no such model" in error.message
        for job in waiting:
            assert isinstance(world.outcome(job), ModeLoadError)
        assert "needs mode 'n', which failed to load" in world.outcome(plain).message
        status = world.status
        assert status["worker_pid"] is None and status["restarts"] == 0
        assert "switch to 'n' failed" in status["last_error"]
        assert len(world.processes.started) == 2, "no restart loop"
        back = world.switch("m")
        world.worker_says_ready()
        assert back.result(0)["status"] == "loaded"


def test_a_worker_command_that_cannot_start_fails_the_switch_clearly():
    with FakeWorld() as world:
        world.processes.refuse = FileNotFoundError(2, "No such file or directory", "fake-worker")
        switched = world.switch("m")
        error = world.outcome(switched)
        assert isinstance(error, ModeLoadError) and "fake-worker" in error.message
        assert world.status["worker_pid"] is None


def test_a_death_while_the_mode_reloads_counts_against_its_budget_and_the_jobs_wait_for_the_next_respawn():
    with FakeWorld(restart_backoff=1.0) as world:
        loaded(world, "m")
        world.kill_worker()  # idle: respawned for the next job
        job = world.submit("echo", "waits")
        world.worker_says_hello()
        world.kill_worker()  # while loading m again
        assert world.status["restarts"] == 2 and not job.done()
        assert world.status["worker_pid"] is None, "backing off before the next respawn"
        world.advance(1.0)
        world.worker_says_ready()
        world.finish_job(value="waits")
        assert job.result(0) == "waits"


# ---------------------------------------------------------------- the restart budget


def test_respawns_back_off_exponentially():
    with FakeWorld(restart_backoff=0.5, restart_backoff_max=10.0, max_restarts=10) as world:
        loaded(world, "m")
        for waited in (0.0, 0.5, 1.0, 2.0):
            world.kill_worker()
            job = world.submit("echo", "next")
            if waited:
                assert world.status["worker_pid"] is None, f"no respawn before {waited}s"
                world.advance(waited - 0.01)
                assert world.status["worker_pid"] is None
                world.advance(0.01)
            world.worker_says_ready()
            world.finish_job(value="next")
            assert job.result(0) == "next"


def test_past_the_restart_budget_the_mode_is_broken_alone_and_an_operators_switch_tries_it_now():
    with FakeWorld(max_restarts=2, restart_backoff=0.0, broken_retry_s=30.0) as world:
        loaded(world, "m")
        for _ in range(3):  # three deaths in the window; two are allowed
            job = world.submit("echo", "dies", mode="m")
            if world.device()["worker_state"] != "busy":
                world.worker_says_ready()
            dies(world)
            assert isinstance(world.outcome(job), WorkerCrashed)
        status = world.status
        assert status["state"] == "running" and status["failed_reason"] is None
        assert list(status["broken_modes"]) == ["m"] and "3 failures in 60s" in status["broken_modes"]["m"]["reason"]
        refused = world.outcome(world.submit("echo", 1))
        assert isinstance(refused, ModeBroken) and "tried again in 30s" in refused.message and refused.retry_in == 30
        other = world.submit("echo", "n", mode="n")
        world.worker_says_ready()
        world.finish_job(value="n")
        assert other.result(0) == "n", "another mode serves on"
        switched = world.switch("m")
        world.step()
        world.worker_says_ready()
        assert switched.result(0)["status"] == "loaded" and world.status["broken_modes"] == {}


def test_a_broken_mode_is_tried_again_by_itself_after_broken_retry_s_and_the_wait_doubles():
    with FakeWorld(max_restarts=0, broken_retry_s=1.0) as world:
        loaded(world, "m")
        dies(world)
        assert "tried again in 1s" in world.outcome(world.submit("echo", 1)).message
        world.advance(1.0)
        assert world.status["broken_modes"] == {}
        back = world.submit("echo", "back")
        world.worker_says_ready()
        world.finish_job(value="back")
        assert back.result(0) == "back", "the trial load works: m serves again"
        dies(world)
        assert "tried again in 2s" in world.outcome(world.submit("echo", 1)).message


def test_when_every_mode_is_broken_the_supervisor_is_failed():
    with FakeWorld(max_restarts=0) as world:
        for mode in ("m", "n"):
            job = world.submit("echo", 1, mode=mode)
            world.worker_fails_to_load()
            assert isinstance(world.outcome(job), ModeLoadError)
            assert world.status["state"] == ("failed" if mode == "n" else "running")
        assert world.status["failed_reason"].startswith("every mode is broken (m: 1 failure in 60s")
        assert isinstance(world.outcome(world.submit("echo", 1, mode="m")), ModeBroken)


def test_jobs_queued_when_the_budget_runs_out_fail_up_to_the_next_switch():
    with FakeWorld(max_restarts=0) as world:
        loaded(world, "m")
        doomed = world.submit("echo", "doomed")
        queued = [world.submit("echo", i) for i in range(3)]
        switched = world.switch("n")
        after = world.submit("echo", "after")
        dies(world)
        assert isinstance(world.outcome(doomed), WorkerCrashed)
        assert all(isinstance(world.outcome(f), ModeBroken) for f in queued)
        world.worker_says_ready()
        assert switched.result(0)["status"] == "loaded"
        world.finish_job(value="after")
        assert after.result(0) == "after"


def test_a_retried_job_that_breaks_the_mode_keeps_its_crash_report():
    with FakeWorld(max_restarts=0) as world:
        loaded(world, "m")
        job = world.submit("echo", 1, retries=3)
        dies(world)
        error = world.outcome(job)
        assert isinstance(error, WorkerCrashed) and "SIGKILL" in error.message
        assert "mode 'm' is broken now" in error.message


def test_restart_clears_the_broken_state_and_gives_a_fresh_worker():
    with FakeWorld(max_restarts=0) as world:
        assert "restart(): no mode is loaded" in world.outcome(world.restart()).message
        loaded(world, "m")
        dies(world)
        assert list(world.status["broken_modes"]) == ["m"]
        restarted = world.restart()
        world.worker_says_ready()
        assert restarted.result(0)["status"] == "restarted" and world.status["broken_modes"] == {}


def test_a_same_mode_switch_does_not_reset_the_restart_budget():
    with FakeWorld(max_restarts=2, restart_backoff=0.0) as world:
        for _ in range(3):
            world.switch("m")
            world.step()
            world.worker_says_ready()
            dies(world)
        assert "m" in world.status["broken_modes"]


# ---------------------------------------------------------------- out of memory


def test_an_oom_recycles_the_worker_once_it_is_idle_and_hands_the_oom_out_once_it_is_gone():
    """The allocator keeps its fragments after an OOM: the worker is stopped,
    not counted as a death, and the caller sees the OOM when the status
    already shows the worker gone."""
    with FakeWorld() as world:
        loaded(world, "m")
        worker = world.worker()
        oom = world.submit("echo", "oom")
        seen: list = []
        oom.add_done_callback(lambda _: seen.append(world.engine.status["worker_pid"]))
        world.fail_job(code="out_of_memory", message="CUDA out of memory")
        assert worker.signals == [signal.SIGTERM] and isinstance(world.outcome(oom), OutOfMemory)
        assert seen == [None], "when the caller sees the OOM, the status shows the worker gone"
        status = world.status
        assert status["oom_recycles"] == 1 and status["restarts"] == 0 and status["broken_modes"] == {}
        again = world.submit("echo", "fresh")
        world.worker_says_ready()
        world.finish_job(value="fresh")
        assert again.result(0) == "fresh" and world.worker() is not worker and world.status["mode"] == "m"


def test_an_oom_recycle_lets_the_jobs_already_handed_over_finish_once():
    """They may have started by the time the OOM is read: killing the worker
    then would run them twice."""
    with FakeWorld(window=4) as world:
        loaded(world, "m")
        worker = world.worker()
        oom = world.submit("echo", "oom")
        after = [world.submit("echo", i) for i in range(3)]
        world.fail_job(code="out_of_memory", message="CUDA out of memory")
        assert isinstance(world.outcome(oom), OutOfMemory)
        assert worker.alive and worker.signals == [] and world.status["oom_recycles"] == 1
        answer_all(world)
        assert [f.result(0) for f in after] == [0, 1, 2] and payloads(world) == ["oom", 0, 1, 2]
        assert worker.signals == [signal.SIGTERM], "recycled once the window was empty"
        world.step()
        assert world.status["worker_pid"] is None and world.status["restarts"] == 0


def test_recycle_on_oom_false_keeps_the_worker():
    with FakeWorld(recycle_on_oom=False) as world:
        loaded(world, "m")
        worker = world.worker()
        oom = world.submit("echo", "oom")
        world.fail_job(code="out_of_memory", message="CUDA out of memory")
        assert isinstance(world.outcome(oom), OutOfMemory) and worker.alive and world.status["oom_recycles"] == 0
