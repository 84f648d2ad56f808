"""A caller that leaves stops its work: a streamed job that runs stops at
its next chunk, through every face a user holds (``Supervisor``,
``AsyncSupervisor``, ``Client``, ``AsyncClient``, Ctrl-C on ``gpuvisor
submit --stream``), and a loop over a stream left early does the same.

The worker's own side is counted, not guessed: diag's ``count`` writes a
line per chunk it makes to a file (``record``), and ``closed`` when its
generator's ``finally`` runs. A reader that leaves counts the lines when it
leaves; once the job has ended, at most a few more may be there (the chunk
being made when the word reached the worker), never the rest of the 10,000.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest

from supervisor import AsyncSupervisor, Supervisor
from supervisor.client import AsyncClient
from supervisor.config import Config
from supervisor.config import load as load_config
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG_HOOKS, config_text
from tests.helpers.daemon import GPUVISOR, serving

SETTINGS = {"default_mode": "diag", "warm_standby": False}
MODES = {"diag": DIAG_HOOKS}  # count's record: a test hook
AFTER_LEAVING = 4
"""Chunks a worker may make after its reader left: the one under way when
the word came, and those made while it travelled (chunks are 50 ms apart)."""


def count(record: Path, n: int = 10_000, delay: float = 0.05) -> dict:
    return {"n": n, "delay": delay, "record": str(record)}


def produced(record: Path) -> int:
    """Chunks the worker has made so far."""
    return sum(1 for line in record.read_text().split() if line.isdigit()) if record.exists() else 0


def closed(record: Path) -> bool:
    """The generator's ``finally`` ran in the worker."""
    return record.exists() and record.read_text().split()[-1:] == ["closed"]


def stopped_soon_after(record: Path, at_leaving: int, idle) -> None:
    """The worker closed the generator within a few chunks of the caller
    leaving, and its job is over (``idle()``: nothing in flight)."""
    wait_until(lambda: closed(record), T, "the generator's finally to run in the worker")
    wait_until(idle, T, "the stopped job to end")
    after = produced(record) - at_leaving
    assert 0 <= after <= AFTER_LEAVING, f"the worker made {after} chunks after its reader left ({at_leaving} before)"


def outcomes(future) -> list[bool]:
    """One entry per outcome the Future is given (its done callbacks run once per outcome)."""
    seen: list[bool] = []
    future.add_done_callback(lambda f: seen.append(f.cancelled()))
    return seen


def config(tmp_path_factory) -> Config:
    path = tmp_path_factory.mktemp("cancel") / "g.toml"
    path.write_text(config_text(MODES, supervisor=SETTINGS))
    return load_config(path)


@pytest.fixture(scope="module")
def sup(tmp_path_factory):
    s = Supervisor(config(tmp_path_factory)).start()
    worker_pid(s)  # its worker is the module's, not the first test's
    yield s
    s.shutdown(drain=False)


def idle(s) -> bool:
    return s.status()["in_flight"] == 0


def worker_pid(s) -> int:
    return s.submit("pid").result(T)


# ------------------------------------------------------------------ in process


@pytest.mark.process
def test_a_loop_left_early_stops_the_stream_in_the_worker_which_serves_on(sup, tmp_path):
    pid, record = worker_pid(sup), tmp_path / "r"
    stream = sup.submit("count", count(record), stream=True)
    seen = outcomes(stream.future)
    for chunk in stream:
        if chunk == 2:
            at_leaving = produced(record)
            break
    stopped_soon_after(record, at_leaving, lambda: idle(sup))
    assert stream.future.cancelled() and seen == [True], "one outcome: cancelled at the reader's word"
    with pytest.raises(CancelledError):
        stream.result(T)
    assert worker_pid(sup) == pid, "the same worker serves the next job"


@pytest.mark.process
def test_cancel_stops_a_running_stream_and_the_future_is_cancelled_at_once(sup, tmp_path):
    pid, record = worker_pid(sup), tmp_path / "r"
    stream = sup.submit("count", count(record), stream=True)
    seen = outcomes(stream.future)
    got = [next(stream), next(stream)]
    at_leaving = produced(record)
    assert stream.cancel() is True
    assert stream.future.cancelled(), "cancel() said True: the Future is cancelled already"
    with pytest.raises(CancelledError):
        for chunk in stream:  # what was on its way, then the end
            got.append(chunk)
    assert got == list(range(len(got)))
    stopped_soon_after(record, at_leaving, lambda: idle(sup))
    assert seen == [True] and stream.cancel() is True, "asked again: still cancelled, nothing more happens"
    assert worker_pid(sup) == pid


@pytest.mark.process
def test_a_cancel_after_the_end_changes_nothing_and_a_job_that_does_not_stream_is_not_stopped(sup, tmp_path):
    stream = sup.submit("count", {"n": 3}, stream=True)
    assert list(stream) == [0, 1, 2]
    assert stream.cancel() is False and stream.result(T) == {"count": 3} and not stream.future.cancelled()
    sleeper = sup.submit("sleep", {"seconds": 0.3})
    wait_until(lambda: sup.status()["in_flight"] == 1, T, "the plain job to run")
    assert sleeper.cancel() is False and sleeper.result(T) == {"slept": 0.3}


@pytest.mark.process
def test_a_queued_stream_cancelled_never_runs(sup, tmp_path):
    record = tmp_path / "r"
    sleeper = sup.submit("sleep", {"seconds": 0.3})
    stream = sup.submit("count", count(record), stream=True)
    assert stream.cancel() is True and stream.future.cancelled()
    assert sleeper.result(T) == {"slept": 0.3}
    assert sup.submit("echo", "after").result(T) == "after"
    assert not record.exists(), "the cancelled stream ran"


@pytest.mark.process
def test_a_cancel_racing_the_end_gives_exactly_one_outcome(sup, tmp_path):
    pid = worker_pid(sup)
    answers = []
    for n in range(12):
        stream = sup.submit("count", {"n": 3}, stream=True)
        seen = outcomes(stream.future)
        for _ in range(n % 4):  # leave after 0 .. 3 chunks: before, during and after the last one
            next(stream, None)
        asked = stream.cancel()
        wait_until(stream.future.done, T, "the job's outcome")
        assert asked == stream.future.cancelled(), "cancel() says True exactly when the Future ends cancelled"
        assert asked or stream.result(T) == {"count": 3}
        wait_until(lambda: idle(sup), T, "the worker to answer the job")
        assert seen == [asked], f"one outcome, once: {seen}"
        answers.append(asked)
    assert worker_pid(sup) == pid and sup.status()["in_flight"] == 0
    assert True in answers, "no cancel ever reached a stream that ran"


@pytest.mark.process
def test_a_chunk_sink_can_give_its_stream_up_from_the_loop_thread(sup, tmp_path):
    """``on_chunk`` runs on the supervisor's loop thread: ``cancel()`` there
    would wait on itself, ``give_up()`` does not wait."""
    record = tmp_path / "r"
    seen: list = []
    errors: list = []
    future = None

    def sink(chunk):
        seen.append(chunk)
        if chunk == 1:
            try:
                future.cancel()
            except RuntimeError as exc:
                errors.append(exc)
            future.give_up()

    ready = threading.Event()
    future = sup.submit("count", {**count(record), "delay": 0.2}, on_chunk=lambda c: (ready.wait(T), sink(c)))
    ready.set()
    wait_until(future.done, T, "the stream to be given up")
    assert future.cancelled() and "would wait on itself" in str(errors[0])
    stopped_soon_after(record, 2, lambda: idle(sup))


@pytest.mark.process
def test_a_stream_cancelled_while_it_waits_in_the_window_is_stopped_when_it_starts(tmp_path_factory, tmp_path):
    path = tmp_path_factory.mktemp("window") / "g.toml"
    path.write_text(config_text(MODES, supervisor={**SETTINGS, "window": 2}))
    record = tmp_path / "r"
    with Supervisor(path) as s:
        pid = worker_pid(s)
        sleeper = s.submit("sleep", {"seconds": 0.5})
        stream = s.submit("count", count(record), stream=True)
        wait_until(lambda: s.status()["in_flight"] == 2, T, "both jobs to be handed to the worker")
        assert stream.cancel() is True and stream.future.cancelled(), "in the window: a stream may still be stopped"
        assert sleeper.result(T) == {"slept": 0.5}
        stopped_soon_after(record, 0, lambda: idle(s))
        assert worker_pid(s) == pid


@pytest.mark.process
def test_async_for_left_early_and_a_cancelled_reading_task_stop_the_stream(tmp_path_factory, tmp_path):
    async def main() -> None:
        async with AsyncSupervisor(config(tmp_path_factory)) as asup:
            pid = await asup.submit("pid")
            left = tmp_path / "left"
            stream = await asup.submit("count", count(left), stream=True)
            async for chunk in stream:
                if chunk == 1:
                    at_leaving = produced(left)
                    break
            await asyncio.to_thread(stopped_soon_after, left, at_leaving, lambda: idle(asup._sync))
            assert stream.future.cancelled()

            dropped = tmp_path / "dropped"
            stream = await asup.submit("count", count(dropped), stream=True)
            first = asyncio.Event()

            async def read() -> None:
                async for _ in stream:
                    first.set()

            task = asyncio.create_task(read())
            await asyncio.wait_for(first.wait(), T)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_leaving = produced(dropped)
            await asyncio.to_thread(stopped_soon_after, dropped, at_leaving, lambda: idle(asup._sync))
            with pytest.raises(asyncio.CancelledError):  # what awaiting a cancelled job gives in asyncio
                await stream.result(T)
            assert await asup.submit("pid") == pid

    asyncio.run(main())


# ------------------------------------------------------------------ through the daemon


@pytest.fixture(scope="module")
def daemon():
    with serving(config_text(MODES, supervisor=SETTINGS)) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon):
    with daemon.client() as c:
        worker_pid(c)
        yield c


@pytest.mark.daemon
def test_a_client_stops_a_running_stream_by_leaving_or_by_cancel(daemon, client, tmp_path):
    pid = worker_pid(client)
    left = tmp_path / "left"
    stream = client.submit("count", count(left), stream=True)
    for chunk in stream:
        if chunk == 2:
            at_leaving = produced(left)
            break
    stopped_soon_after(left, at_leaving, lambda: idle(client))
    wait_until(stream.future.done, T, "the daemon's word")
    assert stream.future.cancelled()

    closing = tmp_path / "closing"
    with daemon.client() as short:  # closed the moment its reader leaves: the cancel still gets out
        for chunk in short.submit("count", count(closing), stream=True):
            if chunk == 1:
                at_leaving = produced(closing)
                break
    stopped_soon_after(closing, at_leaving, lambda: idle(client))

    asked = tmp_path / "asked"
    stream = client.submit("count", count(asked), stream=True)
    seen = outcomes(stream.future)
    next(stream)
    at_leaving = produced(asked)
    assert stream.cancel() is True and stream.future.cancelled()
    stopped_soon_after(asked, at_leaving, lambda: idle(client))
    assert seen == [True]
    with pytest.raises(CancelledError):
        list(stream)

    done = client.submit("count", {"n": 2}, stream=True)
    assert list(done) == [0, 1] and done.cancel() is False and done.result(T) == {"count": 2}
    assert worker_pid(client) == pid


@pytest.mark.daemon
def test_an_async_client_stops_the_stream_its_loop_left(daemon, tmp_path):
    record = tmp_path / "r"

    async def main() -> int:
        async with AsyncClient(daemon.endpoint) as c:
            stream = await c.submit("count", count(record), stream=True)
            async for chunk in stream:
                if chunk == 1:
                    return produced(record)
        raise AssertionError("the stream ended by itself")

    at_leaving = asyncio.run(main())
    with daemon.client() as c:
        stopped_soon_after(record, at_leaving, lambda: idle(c))


@pytest.mark.daemon
def test_ctrl_c_on_submit_stream_cancels_the_job_on_the_daemon_and_exits_130(daemon, client, tmp_path):
    pid, record = worker_pid(client), tmp_path / "r"
    cli = subprocess.Popen(
        [GPUVISOR, "submit", "count", json.dumps(count(record)), "--stream", "--json", "--endpoint", daemon.endpoint],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [cli.stdout.readline() for _ in range(2)]
        assert [json.loads(line) for line in lines] == [{"chunk": 0}, {"chunk": 1}]
        at_leaving = produced(record)
        cli.send_signal(signal.SIGINT)
        assert cli.wait(T) == 130
        assert "the job was cancelled" in cli.stderr.read()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(T)
        cli.stdout.close()
        cli.stderr.close()
    stopped_soon_after(record, at_leaving, lambda: idle(client))
    assert worker_pid(client) == pid
