"""The worker process alone, driven over a real ROUTER socket by the test
playing the supervisor: the handshake, jobs, bad bytes, drain, orphans.
Every frame the worker sends is checked to be a msgpack map with a version."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import msgpack
import pytest

from protocol import (
    PROTOCOL_VERSION,
    Drain,
    Failure,
    Hello,
    Job,
    Load,
    LoadFailed,
    Ready,
    Result,
)
from tests.helpers import T
from tests.helpers.config import DIAG
from tests.helpers.harness import Harness
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


def test_heartbeats_keep_coming_while_a_job_runs(harness):
    handshake(harness)
    harness.send(Job(1, "sleep", {"seconds": 0.6}))
    beats = []
    while True:
        msg = harness.recv(skip_heartbeats=False)
        if isinstance(msg, Result):
            break
        beats.append(msg)
    assert len(beats) >= 2 and any(b.busy for b in beats)


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


@pytest.mark.parametrize(
    "loader, words",
    [
        ("tests.helpers.loaders:raises", ["RuntimeError", "fails on purpose"]),
        ("tests.helpers.loaders:not_a_mapping", ["TypeError", "mapping of task name"]),
        ("worker.modes.nowhere:load", ["ImportError", "cannot import 'worker.modes.nowhere'"]),
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


def test_no_module_of_ours_imports_pickle():
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for package in ("protocol", "supervisor", "worker"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "cloudpickle" not in text, path


def test_a_worker_whose_supervisor_is_already_gone_exits_before_doing_anything():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(T)  # reaped: its pid names no process now
    h = Harness(parent_pid=gone.pid)
    try:
        assert h.proc.wait(T) == ORPHAN_EXIT_CODE
        assert not h.router.poll(100), "an orphan must not even say HELLO"
    finally:
        h.close()


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


def test_a_streamed_chunk_is_sent_as_it_was_yielded_even_if_its_buffer_is_reused(helper_loaders, harness):
    handshake(harness, "s", "tests.helpers.loaders:streams")
    harness.send(Job(1, "reuse", {"n": 20}, stream=True))
    chunks = []
    while not isinstance(msg := harness.recv(), Result):
        chunks.append(msg.value)
    assert [int(c[0]) for c in chunks] == list(range(20)) and all((c == c[0]).all() for c in chunks)
