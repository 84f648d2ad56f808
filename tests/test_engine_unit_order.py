"""The order work runs in, with the engine stepped by hand against a fake
world (no process, no socket, no real time): switch barriers, the loaded
mode first and the starvation bound, windows, batches and streams. Each
asserts what a real-process test asserts (test_scheduling.py,
test_window.py, test_engine_scripted.py), here exactly and in milliseconds."""

from __future__ import annotations

import pytest

from protocol import Job, Load, NoModeLoaded, ProtocolError, WorkerCrashed
from protocol.messages import JobBatch
from tests.helpers.fake_world import FakeWorld
from tests.helpers.world_steps import answer_all, batches, loaded, payloads

pytestmark = pytest.mark.unit

BATCH = {"score": {"max_batch": 8, "max_delay_ms": 0}}
"""READY's word for a handler that takes batches of up to 8, at once."""

DELAYED = {"score": {"max_batch": 8, "max_delay_ms": 50}}
"""The same, waiting up to 50 ms for a batch to fill."""


# ---------------------------------------------------------------- switches


def test_a_switch_is_a_barrier_jobs_before_it_run_in_the_old_mode_and_after_it_in_the_new():
    with FakeWorld() as world:
        loaded(world, "m")
        first = world.worker()
        before = world.submit("echo", "before")
        switched = world.switch("n")
        after = world.submit("echo", "after")
        assert payloads(world) == ["before"], "nothing more may go to the old worker: a barrier comes next"
        world.finish_job(value="done in m")
        assert before.result(0) == "done in m"
        world.step()  # the old worker, stopped, is reaped: the new one starts
        assert not first.alive and world.worker().gen == first.gen + 1
        world.worker_says_ready()
        assert switched.result(0)["previous"] == "m"
        assert payloads(world) == ["after"]
        world.finish_job(value="done in n")
        assert after.result(0) == "done in n"


def test_a_switch_to_the_loaded_mode_is_answered_at_once_and_keeps_the_worker():
    with FakeWorld() as world:
        loaded(world, "m")
        worker = world.worker()
        again = world.switch("m")
        assert again.result(0) == {"mode": "m", "status": "already_loaded", "pid": worker.pid}
        assert world.worker() is worker and worker.signals == [] and len(world.processes.started) == 1


def test_a_switch_to_the_loaded_mode_behind_a_job_for_another_waits_in_line():
    """The job for n would change the mode first: the switch to m is not a
    no-op but a barrier, answered once m is loaded again."""
    with FakeWorld() as world:
        loaded(world, "m")
        hold = world.submit("echo", "hold")
        in_n = world.submit("echo", "in n", mode="n")
        back = world.switch("m")
        assert not back.done()
        answer_all(world)
        world.step()
        world.worker_says_ready()  # n
        answer_all(world)
        assert in_n.result(0) == "in n" and hold.done() and not back.done()
        world.step()
        world.worker_says_ready()  # m again
        assert back.result(0)["status"] == "loaded" and back.result(0)["previous"] == "n"
        assert [p.gen for p in world.processes.started] == [1, 2, 3]


def test_a_restart_of_the_loaded_mode_gives_a_fresh_worker():
    with FakeWorld() as world:
        loaded(world, "m")
        old = world.worker()
        restarted = world.restart()
        world.step()
        assert not old.alive
        world.worker_says_ready()
        assert restarted.result(0)["mode"] == "m" and world.worker().pid != old.pid


# ---------------------------------------------------------------- the loaded mode first, the starvation bound


def test_the_loaded_modes_jobs_go_first_and_each_mode_keeps_its_order():
    with FakeWorld(max_wait_s=5.0) as world:
        loaded(world, "m")
        hold = world.submit("echo", "hold")
        order = [("n", 0), ("m", 1), ("n", 2), ("m", 3)]
        futures = [world.submit("echo", n, mode=mode) for mode, n in order]
        answer_all(world)  # hold, then m's 1 and 3: the loaded mode's jobs went first
        assert hold.done() and [f.done() for f in futures] == [False, True, False, True]
        assert payloads(world) == ["hold", 1, 3]
        world.step()
        world.worker_says_ready()
        answer_all(world)
        assert payloads(world) == [0, 2] and all(f.done() for f in futures)
        assert world.status["generation"] == 2, "one switch for two modes' jobs, not one per job"


def test_another_mode_gets_its_turn_once_its_oldest_job_has_waited_max_wait_s():
    with FakeWorld(max_wait_s=2.0) as world:
        loaded(world, "m")
        world.submit("echo", "m0")
        waiting = world.submit("echo", "n", mode="n")
        for n in range(1, 4):  # m never runs dry: a job comes for each one answered
            world.submit("echo", f"m{n}", mode="m")
            world.advance(0.5)
            world.finish_job(value=None)
        assert not waiting.done() and world.device()["switching_to"] is None
        world.submit("echo", "m4", mode="m")
        world.advance(0.6)  # n's job has waited 2.1 s: its turn comes after the job in flight
        world.finish_job(value=None)
        assert world.device()["switching_to"] == "n"
        world.step()
        world.worker_says_ready()
        world.finish_job(value="n")
        assert waiting.result(0) == "n"
        assert world.status["waiting"]["m"]["jobs"] == 1  # m4 waits for m's next turn


def test_a_mode_that_gets_its_turn_keeps_it_for_max_wait_s_while_it_has_work():
    """The turn is counted from the new mode's first job, not from when the
    other mode's jobs came: two modes never take the worker from each other
    before either runs."""
    with FakeWorld(max_wait_s=1.0) as world:
        loaded(world, "m")
        world.submit("echo", "m0")
        n_jobs = [world.submit("echo", f"n{i}", mode="n") for i in range(3)]
        world.advance(1.5)
        world.finish_job(value=None)  # m0 done; n has waited past max_wait: its turn
        m_job = world.submit("echo", "m1", mode="m")  # m waits now, and its clock starts
        world.step()
        world.worker_says_ready()
        world.advance(0.8)
        world.finish_job(value=None)
        assert n_jobs[0].done() and world.device()["switching_to"] is None and payloads(world) == ["n0", "n1"]
        world.advance(0.3)  # m1 has waited 1.1 s, n's turn as long: m's turn comes
        world.finish_job(value=None)
        assert world.device()["switching_to"] == "m" and not m_job.done() and not n_jobs[2].done()


def test_max_wait_0_serves_modes_in_arrival_order_one_job_a_turn():
    with FakeWorld(max_wait_s=0.0) as world:
        loaded(world, "m")
        hold = world.submit("echo", "hold")
        jobs = [world.submit("echo", n, mode=mode) for n, mode in enumerate("nmn")]
        answer_all(world)
        assert hold.done() and not any(f.done() for f in jobs)
        for n in range(3):
            world.step()
            world.worker_says_ready()
            answer_all(world)
            assert [f.done() for f in jobs] == [i <= n for i in range(3)]
        assert world.status["generation"] == 4


def test_a_job_naming_no_mode_runs_in_the_mode_its_caller_saw():
    with FakeWorld() as world:
        loaded(world, "m")
        hold = world.submit("echo", "hold")
        in_n = world.submit("echo", "in n", mode="n")
        plain = world.submit("echo", "plain")  # after a job for n: n is the mode it would find
        in_m = [world.submit("echo", i, mode="m") for i in range(3)]
        answer_all(world)
        assert hold.done() and all(f.done() for f in in_m) and not plain.done()
        world.step()
        world.worker_says_ready()
        assert world.sent()[0].mode == "n"
        answer_all(world)
        assert in_n.result(0) == "in n" and plain.result(0) == "plain"


def test_a_job_naming_no_mode_when_none_is_loaded_fails_at_once():
    with FakeWorld() as world:
        job = world.submit("echo", 1)
        error = world.outcome(job)
        assert isinstance(error, NoModeLoaded) and "pass mode= or call switch_mode()" in error.message
        assert world.processes.started == []


def test_status_shows_what_waits_for_each_mode_and_for_how_long():
    with FakeWorld() as world:
        loaded(world, "m")
        world.submit("echo", "hold")
        world.submit("echo", 0, mode="m")
        world.advance(0.25)
        world.submit("echo", 1, mode="n")
        world.submit("echo", 2, mode="n")
        world.advance(0.5)
        waiting = world.status["waiting"]
        assert waiting["m"]["jobs"] == 1 and waiting["n"]["jobs"] == 2
        assert waiting["m"]["oldest_s"] == pytest.approx(0.75) and waiting["n"]["oldest_s"] == pytest.approx(0.5)
        assert world.status["queued"] == 3


# ---------------------------------------------------------------- windows


def test_a_window_hands_that_many_jobs_over_before_any_answer():
    with FakeWorld(window=3) as world:
        loaded(world, "m")
        futures = [world.submit("echo", i) for i in range(5)]
        assert payloads(world) == [0, 1, 2]
        assert (world.status["in_flight"], world.status["queued"]) == (3, 2)
        assert [f.cancel() for f in futures[1:3]] == [False, False], "handed over: they count as running"
        world.finish_job(value="a")
        assert payloads(world) == [0, 1, 2, 3], "one answer frees one place"
        assert futures[0].result(0) == "a"
        assert futures[4].cancel() is True


def test_window_one_sends_one_job_at_a_time():
    with FakeWorld(window=1) as world:
        loaded(world, "m")
        running = world.submit("echo", 0)
        queued = world.submit("echo", 1)
        assert payloads(world) == [0] and (world.status["in_flight"], world.status["queued"]) == (1, 1)
        assert queued.cancel() is True
        world.finish_job(value=0)
        assert running.result(0) == 0 and payloads(world) == [0]


def test_jobs_sent_ahead_of_a_crash_run_on_the_next_worker_without_using_retries():
    with FakeWorld(window=8, restart_backoff=0.0) as world:
        loaded(world, "m")
        victim = world.submit("echo", "victim")
        behind = [world.submit("echo", i) for i in range(6)]
        assert payloads(world) == ["victim", *range(6)]
        old = world.worker()
        world.kill_worker()
        world.advance(0.1)  # its last words: none came
        assert isinstance(world.outcome(victim), WorkerCrashed)
        world.worker_says_ready()
        assert world.worker() is not old and payloads(world) == list(range(6))
        answer_all(world)
        assert [f.result(0) for f in behind] == list(range(6))
        assert world.status["restarts"] == 1


def test_in_a_window_only_the_head_job_runs_on_the_clock():
    """Each job's timeout counts from when it reaches the head: five jobs
    of 1 s each, handed over together, may take 2 s between them."""
    with FakeWorld(window=8) as world:
        loaded(world, "m")
        futures = [world.submit("echo", i, timeout=1.0) for i in range(5)]
        for i in range(5):
            world.advance(0.4)
            world.finish_job(value=i)
        assert [f.result(0) for f in futures] == list(range(5))
        stuck = world.submit("echo", "stuck", timeout=0.5)
        after = world.submit("echo", "after")
        world.advance(0.6)
        world.step()
        world.advance(0.1)
        assert type(world.outcome(stuck)).__name__ == "JobTimeout"
        world.worker_says_ready()
        world.finish_job(value="after")
        assert after.result(0) == "after"


def test_a_switch_waits_for_the_whole_window():
    with FakeWorld(window=8) as world:
        loaded(world, "m")
        before = [world.submit("echo", i) for i in range(5)]
        switched = world.switch("n")
        first = world.worker()
        for i in range(4):
            world.finish_job(value=i)
            assert first.signals == [], "a job handed over is still to run"
        world.finish_job(value=4)
        assert [f.result(0) for f in before] == list(range(5)) and first.signals
        world.step()
        world.worker_says_ready()
        assert switched.result(0)["previous"] == "m"


# ---------------------------------------------------------------- batches


def test_ready_lists_the_batch_tasks_and_jobs_waiting_for_one_go_as_one_batch():
    with FakeWorld() as world:
        loaded(world, "m", tasks=("score", "echo"), batch=BATCH)
        hold = world.submit("score", "hold")  # alone: the last batch of its task held one
        futures = [world.submit("score", i) for i in range(20)]
        world.finish_job(value="hold")
        assert hold.result(0) == "hold"
        assert batches(world) == [["hold"], list(range(8))]
        assert isinstance(world.sent()[-1], JobBatch) and world.sent()[-1].task == "score"
        answer_all(world)  # each job of a batch has its own answer
        assert batches(world)[2:] == [list(range(8, 16)), list(range(16, 20))]
        assert [f.result(0) for f in futures] == list(range(20))
        assert world.status["batches"] == {"count": 3, "jobs": 20, "largest": 8, "last": 4}


def test_a_lone_job_for_a_batch_handler_goes_at_once():
    with FakeWorld() as world:
        loaded(world, "m", tasks=("score",), batch=BATCH)
        lone = world.submit("score", "alone")
        assert isinstance(world.sent()[-1], Job)
        world.finish_job(value="alone")
        assert lone.result(0) == "alone" and world.status["batches"]["count"] == 0


def test_after_a_batch_a_short_one_waits_max_delay_ms_for_company_then_goes_as_it_is():
    with FakeWorld() as world:
        loaded(world, "m", tasks=("score",), batch=DELAYED)
        world.submit("score", "hold")  # alone: the last batch of its task held one
        [world.submit("score", i) for i in range(3)]
        answer_all(world)  # hold alone, then the three that waited for it, together
        assert batches(world) == [["hold"], [0, 1, 2]]
        late = world.submit("score", "late")  # after a batch of three: it waits for others
        world.advance(0.03)
        assert batches(world)[-1] == [0, 1, 2] and not late.done()
        world.submit("score", "company")
        world.advance(0.03)  # 60 ms after "late" came: past its 50 ms
        assert batches(world)[-1] == ["late", "company"]


def test_the_config_can_make_a_batch_smaller_or_turn_it_off():
    smaller = {"m": {"loader": "fake:m", "batch": {"score": {"max_batch": 3, "max_delay_ms": 0}}}}
    with FakeWorld(smaller) as world:
        loaded(world, "m", tasks=("score",), batch=BATCH)
        world.submit("score", "hold")
        [world.submit("score", i) for i in range(7)]
        answer_all(world)
        assert batches(world) == [["hold"], [0, 1, 2], [3, 4, 5], [6]]
    off = {"m": {"loader": "fake:m", "batch": {"score": {"max_batch": 1}}}}
    with FakeWorld(off) as world:
        loaded(world, "m", tasks=("score",), batch=BATCH)
        world.submit("score", "hold")
        [world.submit("score", i) for i in range(3)]
        answer_all(world)
        assert batches(world) == [["hold"], [0], [1], [2]] and world.status["batches"]["count"] == 0


def test_a_batch_takes_only_its_own_task_and_never_jumps_over_another_tasks_job():
    with FakeWorld() as world:
        loaded(world, "m", tasks=("score", "echo"), batch=BATCH)
        world.submit("echo", "hold")
        plan = ["score", "score", "echo", "score", "score", "echo", "score"]
        futures = [world.submit(task, n) for n, task in enumerate(plan)]
        answer_all(world)
        assert batches(world) == [["hold"], [0, 1], [2], [3, 4], [5], [6]]
        assert [f.result(0) for f in futures] == list(range(len(plan)))


def test_a_cancelled_job_is_never_part_of_a_batch():
    with FakeWorld() as world:
        loaded(world, "m", tasks=("score",), batch=BATCH)
        world.submit("score", "hold")
        futures = [world.submit("score", i) for i in range(6)]
        assert futures[2].cancel() and futures[4].cancel()
        answer_all(world)
        assert batches(world) == [["hold"], [0, 1, 3, 5]]
        assert futures[2].cancelled() and futures[4].cancelled()


def test_a_kill_mid_batch_gives_every_job_of_it_one_outcome_and_a_retry_runs_again_alone():
    with FakeWorld(restart_backoff=0.0) as world:
        loaded(world, "m", tasks=("score",), batch=BATCH)
        world.submit("score", "hold")
        plain = world.submit("score", "plain")
        retried = world.submit("score", "retried", retries=1)
        world.finish_job(value="hold")
        assert batches(world)[-1] == ["plain", "retried"]
        world.kill_worker()
        world.advance(0.1)
        error = world.outcome(plain)
        assert isinstance(error, WorkerCrashed) and "SIGKILL" in error.message and not retried.done()
        world.worker_says_ready(tasks=("score",), batch=BATCH)
        assert batches(world) == [["retried"]]
        world.finish_job(value="again")
        assert retried.result(0) == "again"


# ---------------------------------------------------------------- streams


def test_a_stream_gets_its_chunks_in_order_then_its_result():
    with FakeWorld() as world:
        loaded(world, "m")
        chunks: list = []
        stream = world.submit("words", "a b", on_chunk=chunks.append)
        assert world.sent()[-1].stream is True
        world.send_chunk("a", 1)
        world.send_chunk("b", 2)
        world.finish_job(value=2)
        assert chunks == ["a", "b"] and stream.result(0) == 2


def test_a_chunk_out_of_order_kills_the_worker_and_fails_the_stream_with_a_protocol_error():
    with FakeWorld() as world:
        loaded(world, "m")
        chunks: list = []
        stream = world.submit("words", "a b", on_chunk=chunks.append)
        world.send_chunk("a", 1)
        world.send_chunk("c", 3)
        world.step()
        world.advance(0.1)
        error = world.outcome(stream)
        assert isinstance(error, ProtocolError) and "sent chunk 3 of job 1 after chunk 1" in error.message
        assert chunks == ["a"] and world.status["restarts"] == 1


def test_the_first_message_to_a_new_worker_is_its_mode():
    with FakeWorld() as world:
        world.switch("m")
        world.worker_says_hello()
        load = world.sent()[0]
        assert isinstance(load, Load) and (load.mode, load.loader) == ("m", "fake:m")
