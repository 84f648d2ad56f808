"""The worker process alone, driven over a real ROUTER socket by the test
playing the supervisor: the handshake, jobs, batches, bad bytes, drain,
orphans, heartbeats on their own socket, a dropped connection. Every frame
the worker sends is checked to be a msgpack map with a version."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import msgpack
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Chunk,
    Drain,
    Failure,
    Heartbeat,
    Hello,
    Job,
    Load,
    LoadFailed,
    Ready,
    Result,
    encode_batch,
    encode_job,
)
from protocol.messages import Cancel
from tests.helpers import T
from tests.helpers.config import DIAG, DIAG_HOOKS
from tests.helpers.harness import Harness
from worker.batching import batched
from worker.lifeline import ORPHAN_EXIT_CODE


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def handshake(h: Harness, mode="diag", loader=DIAG, args=None):
    hello = h.recv()
    assert hello == Hello(pid=h.proc.pid, gen=1)
    h.send(Load(mode, loader, args or {}))
    return h.recv()


@pytest.mark.process
def test_handshake_jobs_and_drain(harness):
    ready = handshake(harness)
    assert isinstance(ready, Ready) and ready.mode == "diag"
    assert {"echo", "sleep", "pid", "fail", "crash"} <= set(ready.tasks) and ready.load_seconds >= 0
    harness.send(Job(1, "echo", {"x": [1, 2]}))
    assert harness.recv() == Result(1, {"x": [1, 2]})
    harness.send(Job(2, "pid", None))
    assert harness.recv() == Result(2, harness.proc.pid)
    harness.send(Job(3, "fail", {"message": "nope"}))
    failure = harness.recv()
    assert isinstance(failure, Failure) and failure.job == 3
    assert failure.error["code"] == "job_failed" and failure.error["remote_type"] == "RuntimeError"
    assert "nope" in failure.error["traceback"] and "diag.py" in failure.error["traceback"]
    harness.send(Job(4, "no_such_task", None))
    unknown = harness.recv()
    assert unknown.error["code"] == "unknown_task" and "no_such_task" in unknown.error["message"]
    harness.send(Drain())
    assert harness.proc.wait(T) == 0


@pytest.mark.process
def test_heartbeats_keep_coming_on_their_own_socket_while_a_job_runs(harness):
    """The handler sleeps through ten heartbeat intervals on the main thread;
    the heartbeats come from the heartbeat socket all the while (the harness
    checks which socket each message came on)."""
    handshake(harness)
    harness.send(Job(1, "sleep", {"seconds": 1.0}))
    beats = []
    while True:
        msg = harness.recv(skip_heartbeats=False)
        if isinstance(msg, Result):
            break
        beats.append(msg)
    assert len(beats) >= 3, beats  # during the job, whose handler never gave the thread back
    assert all(isinstance(b, Heartbeat) for b in beats), beats
    harness.send(Job(2, "echo", "after"))
    assert harness.recv() == Result(2, "after")


@pytest.mark.process
def test_a_dropped_connection_ends_the_worker_with_exit_4():
    """libzmq drops a connection that sends a frame over the ROUTER's
    MAXMSGSIZE, without a word to either side; the worker must notice (on
    its heartbeat thread, watching the job socket) and exit 4 instead of
    reconnecting with the job unanswered."""
    h = Harness(max_message_bytes=1024)
    try:
        handshake(h)
        h.send(Job(1, "echo", b"x" * 4096))  # its RESULT is over the limit on the way back
        assert h.proc.wait(T) == 4
        assert "the supervisor dropped our connection" in h.proc.stderr.read().decode()
    finally:
        h.close()


@pytest.mark.process
def test_bad_bytes_from_the_supervisor_are_logged_and_the_worker_goes_on(harness):
    handshake(harness)
    harness.send_raw(b"\xc1garbage")
    harness.send_raw(pickle.dumps(Job(9, "echo", "pickled")))
    harness.send_raw(msgpack.packb({"v": 1, "k": "job", "job": "one", "task": "echo", "payload": 1}))
    harness.send_raw(msgpack.packb({"v": 1, "k": "hello", "pid": 1, "gen": 1}))  # wrong direction
    harness.send(Load("diag", DIAG, {}))  # already loaded: ignored
    harness.send(Job(5, "echo", "still here"))
    assert harness.recv() == Result(5, "still here")
    harness.send(Drain())
    assert harness.proc.wait(T) == 0
    stderr = harness.proc.stderr.read().decode()
    assert stderr.count("dropped a malformed message") == 4, stderr
    assert "already loaded" in stderr


@pytest.mark.process
def test_a_result_msgpack_cannot_carry_is_a_job_failure_and_the_worker_goes_on(tmp_path):
    mod = tmp_path / "badresult.py"
    mod.write_text("def load():\n    return {'setty': lambda p: {1, 2}}\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    h = Harness(env=env)
    try:
        handshake(h, mode="b", loader="badresult:load")
        h.send(Job(1, "setty", None))
        failure = h.recv()
        assert isinstance(failure, Failure) and failure.error["code"] == "job_failed"
        assert "cannot be sent" in failure.error["message"]
        h.send(Job(2, "setty", None))  # and the worker still serves
        assert isinstance(h.recv(), Failure)
    finally:
        h.close()


@pytest.mark.process
@pytest.mark.parametrize(
    "loader, words",
    [
        ("tests.helpers.loaders:raises", ["RuntimeError", "fails on purpose"]),
        ("tests.helpers.loaders:not_a_mapping", ["TypeError", "mapping of task name"]),
        ("worker.modes.nowhere:load", ["LoaderNotFound", "cannot import 'worker.modes.nowhere'"]),
        ("worker.modes.diag:nothing", ["AttributeError", "has no 'nothing'"]),
    ],
)
def test_a_loader_that_fails_sends_load_failed_with_its_traceback_and_exits(helper_loaders, loader, words):
    h = Harness()
    try:
        failed = handshake(h, mode="m", loader=loader)
        assert isinstance(failed, LoadFailed) and failed.error["code"] == "mode_load_error"
        for word in words:
            assert word in failed.error["traceback"], failed.error
        assert h.proc.wait(T) == 3
    finally:
        h.close()


@pytest.mark.process
def test_every_frame_the_worker_sends_is_a_versioned_msgpack_map_and_never_a_pickle(harness):
    handshake(harness)
    for i in range(5):
        harness.send(Job(i, "echo", {"i": i, "b": b"\x80\x04"}))
        harness.recv()
    harness.send(Drain())
    assert harness.proc.wait(T) == 0
    assert len(harness.raw_frames) >= 7
    for frame in harness.raw_frames:
        assert not frame.startswith(b"\x80"), "pickle protocol marker on the wire"
        header = msgpack.unpackb(frame, raw=False)
        assert isinstance(header, dict) and header["v"] == PROTOCOL_VERSION


@pytest.mark.unit
def test_no_module_of_ours_imports_pickle():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for package in ("protocol", "supervisor", "worker"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "cloudpickle" not in text, path


@pytest.mark.process
def test_a_worker_whose_supervisor_is_already_gone_exits_before_doing_anything():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(T)  # reaped: its pid names no process now
    h = Harness(parent_pid=gone.pid)
    try:
        assert h.proc.wait(T) == ORPHAN_EXIT_CODE
        assert not h.router.poll(100), "an orphan must not even say HELLO"
    finally:
        h.close()


@pytest.mark.process
def test_a_job_message_that_cannot_be_read_is_answered_under_its_id(harness):
    """A header whose array reference is broken still names its job: the job
    gets its one answer (a ProtocolError) instead of waiting forever."""
    handshake(harness)
    bad_ref = msgpack.ExtType(1, msgpack.packb([1, "<f4", [3]]))  # 12 bytes promised, 4 sent
    harness.send_raw(msgpack.packb({"v": 1, "k": "job", "job": 8, "task": "echo", "payload": bad_ref}), b"\0" * 4)
    failure = harness.recv()
    assert isinstance(failure, Failure) and failure.job == 8 and failure.error["code"] == "protocol_error"
    assert "has 4 bytes" in failure.error["message"]
    harness.send(Job(9, "echo", "still here"))
    assert harness.recv() == Result(9, "still here")


@pytest.mark.process
def test_a_streamed_chunk_is_sent_as_it_was_yielded_even_if_its_buffer_is_reused(helper_loaders, harness):
    handshake(harness, "s", "tests.helpers.loaders:streams")
    harness.send(Job(1, "reuse", {"n": 20}, stream=True))
    chunks = []
    while not isinstance(msg := harness.recv(), Result):
        chunks.append(msg.value)
    assert [int(c[0]) for c in chunks] == list(range(20)) and all((c == c[0]).all() for c in chunks)


@pytest.mark.process
def test_a_cancel_stops_the_running_stream_at_its_next_chunk_and_what_came_with_it_keeps_its_turn(harness, tmp_path):
    handshake(harness, args=DIAG_HOOKS["args"])
    record = tmp_path / "produced"
    harness.send(Job(1, "count", {"n": 100_000, "delay": 0.01, "record": str(record)}, stream=True))
    assert harness.recv() == Chunk(1, 1, 0)
    harness.send(Job(2, "echo", "kept"))  # the next job of a window, read while job 1 streams
    harness.send(Cancel(2))  # not running: ignored
    harness.send(Cancel(1))
    seqs = []
    while isinstance(msg := harness.recv(), Chunk):
        seqs.append(msg.seq)
    assert seqs == list(range(2, len(seqs) + 2)), "every chunk before the answer, in order"
    assert isinstance(msg, Failure) and msg.job == 1 and msg.error["code"] == "job_cancelled", msg
    lines = record.read_text().split()
    assert lines[-1] == "closed", "the generator's finally ran"
    assert len(lines) - 1 == len(seqs) + 1, "it stopped at the chunk it had sent: none made and not sent"
    assert harness.recv() == Result(2, "kept")
    harness.send(Cancel(1))  # answered already: ignored
    harness.send(Job(3, "count", {"n": 2}, stream=True))
    assert [harness.recv() for _ in range(3)] == [Chunk(3, 1, 0), Chunk(3, 2, 1), Result(3, {"count": 2})]
    harness.send(Drain())
    assert harness.proc.wait(T) == 0


# ------------------------------------------------------------------ batches


def send_batch(h: Harness, task: str, jobs: list[tuple[int, object]]) -> None:
    """A BATCH message of ``(job id, payload)`` pairs, as the supervisor encodes it."""
    h.send_raw(*encode_batch(task, [encode_job(job, task, payload) for job, payload in jobs]))


@pytest.mark.process
def test_ready_lists_the_batch_tasks_and_a_batch_is_one_call_answered_job_by_job_in_order(harness):
    ready = handshake(harness)
    limits = {"max_batch": 8, "max_delay_ms": 20.0}
    assert ready.batch == {"batch_echo": limits, "batch_fail": limits, "batch_sleep": limits}
    send_batch(harness, "batch_echo", [(10 + i, {"i": i}) for i in range(5)])
    answers = [harness.recv() for _ in range(5)]
    assert answers == [Result(10 + i, {"payload": {"i": i}, "batch": 5}) for i in range(5)]
    harness.send(Job(20, "batch_echo", "alone"))  # a JOB for a batch handler is a batch of one
    assert harness.recv() == Result(20, {"payload": "alone", "batch": 1})
    harness.send(Job(21, "batch_echo", "streamed", stream=True))  # no chunks, only the result
    assert harness.recv() == Result(21, {"payload": "streamed", "batch": 1})
    harness.send(Drain())
    assert harness.proc.wait(T) == 0


@pytest.mark.process
def test_a_raising_batch_handler_fails_every_job_with_the_same_error_and_the_worker_serves_on(harness):
    handshake(harness)
    send_batch(harness, "batch_fail", [(1, "a"), (2, "b"), (3, "c")])
    failures = [harness.recv() for _ in range(3)]
    assert [f.job for f in failures] == [1, 2, 3] and all(isinstance(f, Failure) for f in failures)
    assert failures[0].error == failures[1].error == failures[2].error
    assert failures[0].error["code"] == "job_failed" and failures[0].error["remote_type"] == "RuntimeError"
    assert "batch_fail on purpose" in failures[0].error["message"]
    send_batch(harness, "batch_echo", [(4, "d"), (5, "e")])
    assert [harness.recv() for _ in range(2)] == [Result(4, {"payload": "d", "batch": 2}),
                                                  Result(5, {"payload": "e", "batch": 2})]  # fmt: skip


@pytest.mark.process
def test_a_batch_for_a_handler_that_takes_one_payload_runs_each_job_alone_in_order(harness):
    handshake(harness)
    send_batch(harness, "echo", [(1, "a"), (2, {"b": 2}), (3, None)])
    assert [harness.recv() for _ in range(3)] == [Result(1, "a"), Result(2, {"b": 2}), Result(3, None)]
    send_batch(harness, "no_such_task", [(4, 1), (5, 2)])
    unknown = [harness.recv() for _ in range(2)]
    assert [u.job for u in unknown] == [4, 5] and {u.error["code"] for u in unknown} == {"unknown_task"}


@pytest.mark.process
def test_a_batch_message_that_cannot_be_read_is_answered_under_each_of_its_job_ids(harness):
    handshake(harness)
    mixed = encode_batch("echo", [encode_job(1, "echo", "a"), encode_job(2, "pid", None)])  # two tasks in one
    harness.send_raw(*mixed)
    failures = [harness.recv() for _ in range(2)]
    assert [f.job for f in failures] == [1, 2]
    for f in failures:
        assert f.error["code"] == "protocol_error"
        assert f.error["message"].startswith("the batch message could not be read:"), f.error
    harness.send(Job(3, "echo", "still here"))
    assert harness.recv() == Result(3, "still here")


BATCH_MODE = """
from worker.batching import batched

@batched(max_batch=4, max_delay_ms=0)
def short(payloads):
    return payloads[:-1]

@batched(max_batch=4)
def not_a_list(payloads):
    return {"n": len(payloads)}

@batched(max_batch=4)
def unsendable(payloads):
    return [{1, 2} if p == "bad" else p for p in payloads]

@batched(max_batch=4)
def oom(payloads):
    bytearray(1 << 62)

def load():
    return {"short": short, "not_a_list": not_a_list, "unsendable": unsendable, "oom": oom}
"""


@pytest.fixture
def batch_worker(tmp_path):
    (tmp_path / "batchmode.py").write_text(BATCH_MODE)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    h = Harness(env=env)
    ready = handshake(h, mode="b", loader="batchmode:load")
    assert ready.batch["short"] == {"max_batch": 4, "max_delay_ms": 0.0}
    yield h
    h.close()


@pytest.mark.process
@pytest.mark.parametrize(
    "task, words",
    [
        ("short", "batch handler 'short' returned a list of 2; it must return a list of 3 results"),
        ("not_a_list", "batch handler 'not_a_list' returned a dict; it must return a list of 3 results"),
    ],
)
def test_a_batch_handler_that_returns_no_list_of_the_right_length_fails_each_job(batch_worker, task, words):
    send_batch(batch_worker, task, [(1, "a"), (2, "b"), (3, "c")])
    failures = [batch_worker.recv() for _ in range(3)]
    assert [f.job for f in failures] == [1, 2, 3]
    for f in failures:
        assert isinstance(f, Failure) and f.error["code"] == "job_failed" and words in f.error["message"], f


@pytest.mark.process
def test_a_batch_item_that_cannot_be_sent_fails_that_job_alone(batch_worker):
    send_batch(batch_worker, "unsendable", [(1, "a"), (2, "bad"), (3, "c")])
    first, bad, last = (batch_worker.recv() for _ in range(3))
    assert first == Result(1, "a") and last == Result(3, "c")
    assert isinstance(bad, Failure) and bad.job == 2 and bad.error["code"] == "job_failed"
    assert "returned a result that cannot be sent" in bad.error["message"]


@pytest.mark.process
def test_a_batch_that_runs_out_of_memory_is_out_of_memory_for_each_job(batch_worker):
    send_batch(batch_worker, "oom", [(1, None), (2, None)])
    failures = [batch_worker.recv() for _ in range(2)]
    assert [f.job for f in failures] == [1, 2]
    assert {f.error["code"] for f in failures} == {"out_of_memory"}
    send_batch(batch_worker, "unsendable", [(3, "still here")])
    assert batch_worker.recv() == Result(3, "still here")


@pytest.mark.unit
@pytest.mark.parametrize(
    "args, words",
    [
        ({"max_batch": 0}, "max_batch must be a whole number from 1 to 4096"),
        ({"max_batch": 2.0}, "max_batch must be a whole number"),
        ({"max_delay_ms": -1}, "max_delay_ms must be a finite number >= 0"),
        ({"max_delay_ms": float("nan")}, "max_delay_ms must be a finite number >= 0"),
    ],
)
def test_batched_refuses_limits_the_supervisor_could_not_honour(args, words):
    with pytest.raises(ValueError, match=words):
        batched(**args)


@pytest.mark.unit
def test_batched_refuses_a_generator_handler():
    def stream(payloads):
        yield from payloads

    with pytest.raises(TypeError, match="a batch handler returns a list"):
        batched()(stream)
