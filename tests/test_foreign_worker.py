"""The real supervisor driving tests/helpers/foreign_worker.py, a worker
written from docs/protocol.md alone: the document is enough to write a
worker."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from supervisor import JobFailed, ModeLoadError, ProtocolError, Supervisor, UnknownTask, WorkerCrashed
from tests.helpers import T, pid_gone
from tests.helpers.config import config_text

pytestmark = pytest.mark.process

FOREIGN = Path(__file__).resolve().parent / "helpers" / "foreign_worker.py"
MODES = {
    "f": "foreign.any:thing",
    "g": {"loader": "foreign.other:thing", "args": {"tag": "g"}},
    "broken": "foreign:fail",
}


@pytest.fixture
def config(write_config):
    """``config(heartbeat_interval=.., heartbeat_timeout=..)`` -> the path of a config file."""

    def write(heartbeat_interval: float = 0.2, heartbeat_timeout: float = 10.0) -> Path:
        supervisor = {"worker_command": [sys.executable, str(FOREIGN)], "heartbeat_interval": heartbeat_interval,
                      "heartbeat_timeout": heartbeat_timeout, "load_timeout": 30.0, "stop_timeout": 2.0}  # fmt: skip
        return write_config(config_text(MODES, supervisor=supervisor))

    return write


def test_the_foreign_worker_loads_and_runs_jobs(config):
    with Supervisor(config()) as sup:
        switched = sup.switch_mode("f").result(T)
        assert switched["status"] == "loaded" and switched["mode"] == "f"
        assert sup.submit("echo", {"x": [1, "two", 3.0, None, b"\x00bytes"]}).result(T) == {
            "x": [1, "two", 3.0, None, b"\x00bytes"]
        }
        assert sup.submit("echo", {1: "a non-string key"}).result(T) == {1: "a non-string key"}
        assert sup.submit("add", {"a": 2, "b": 3}).result(T) == 5
        pid = sup.submit("pid").result(T)
        assert pid == switched["pid"] != os.getpid()


def test_a_handler_error_comes_back_as_job_failed_with_its_type_and_traceback(config):
    with Supervisor(config()) as sup:
        sup.switch_mode("f").result(T)
        with pytest.raises(JobFailed) as info:
            sup.submit("boom", {"why": "on purpose"}).result(T)
        err = info.value
        assert err.remote_type == "Boom"
        assert "Traceback" in err.traceback and "_boom" in err.traceback and "boom on purpose" in err.traceback
        assert "boom on purpose" in str(err)
        assert sup.submit("add", {"a": 1, "b": 1}).result(T) == 2, "the worker carries on after a failure"


def test_an_unknown_task_is_unknown_task(config):
    with Supervisor(config()) as sup:
        sup.switch_mode("f").result(T)
        with pytest.raises(UnknownTask) as info:
            sup.submit("no_such_task", None).result(T)
        assert "no_such_task" in str(info.value)
        assert sup.submit("echo", "still here").result(T) == "still here"


def test_a_failing_load_fails_the_switch_with_mode_load_error(config):
    with Supervisor(config()) as sup:
        with pytest.raises(ModeLoadError) as info:
            sup.switch_mode("broken").result(T)
        assert "fails on purpose" in str(info.value)
        assert sup.switch_mode("f").result(T)["status"] == "loaded", "a good mode loads after a failed one"
        assert sup.submit("add", {"a": 40, "b": 2}).result(T) == 42


def test_switching_between_two_foreign_modes_starts_a_new_process(config):
    with Supervisor(config()) as sup:
        first = sup.switch_mode("f").result(T)
        old = sup.submit("pid").result(T)
        second = sup.switch_mode("g").result(T)
        assert second["status"] == "loaded" and second["previous"] == "f"
        new = sup.submit("pid").result(T)
        assert old == first["pid"] and new == second["pid"] and new != old
        assert pid_gone(old), "the old foreign worker is reaped before the new one starts"


def test_heartbeats_flow_while_a_job_runs(config):
    # 1.5 s of work with a 1.0 s heartbeat timeout: only heartbeats sent while
    # the job runs keep the supervisor from declaring the worker hung.
    with Supervisor(config(heartbeat_interval=0.2, heartbeat_timeout=1.0)) as sup:
        pid = sup.switch_mode("f").result(T)["pid"]
        start = time.monotonic()
        assert sup.submit("sleep", {"seconds": 1.5}).result(T) is None
        assert time.monotonic() - start >= 1.5
        assert sup.submit("pid").result(T) == pid, "the same worker, not a restarted one"


def test_leaving_the_with_block_drains_the_worker_and_it_exits_0(config, caplog):
    with Supervisor(config()) as sup:
        pid = sup.switch_mode("f").result(T)["pid"]
        assert sup.submit("echo", 1).result(T) == 1
    assert pid_gone(pid)
    assert "drained and exited with code 0" in caplog.text


def test_malformed_frames_are_logged_and_skipped(tmp_path):
    """The worker alone, against a bare ROUTER: bad frames get one stderr line
    each and no answer, and the worker goes on to serve the next good job."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVTIMEO, T * 1000)
    sockdir = tempfile.mkdtemp(prefix="gpuvisor-test-")
    endpoint = f"ipc://{sockdir}/worker.sock"
    router.bind(endpoint)
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(FOREIGN), "--endpoint", endpoint, "--gen", "7"]
            + ["--parent-pid", str(os.getpid()), "--heartbeat-interval", "0.1"],
            stdin=subprocess.DEVNULL,
            stderr=err,
        )

    def send(frames):
        router.send_multipart([b"g7", *frames])

    def pack(**fields):
        return msgpack.packb({"v": 1, **fields}, use_bin_type=True)

    def next_non_heartbeat():
        while True:
            routing_id, frame = router.recv_multipart()
            assert routing_id == b"g7"
            msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            if msg["k"] != "heartbeat":
                return msg

    try:
        hello = next_non_heartbeat()
        assert hello == {"v": 1, "k": "hello", "pid": proc.pid, "gen": 7}
        send([pack(k="load", mode="m", loader="x.y:z", args={})])
        ready = next_non_heartbeat()
        assert ready["k"] == "ready" and ready["mode"] == "m" and "echo" in ready["tasks"]
        bad = [
            [b"\xc1 not msgpack"],
            [msgpack.packb([1, 2, 3])],
            [pack(k="nonsense")],
            [msgpack.packb({"v": 2, "k": "drain"})],
            [pack(k="job", job=True, task="echo", payload=1)],
            [pack(k="job", job=1, task="echo")],
            [pack(k="job", job=1, task="echo", payload=msgpack.ExtType(5, b"x"))],
            [pack(k="job", job=1, task="echo", payload=1), b"a second frame"],
        ]
        for frames in bad:
            send(frames)
        send([pack(k="job", job=9, task="echo", payload="good")])
        assert next_non_heartbeat() == {"v": 1, "k": "result", "job": 9, "value": "good"}
        send([pack(k="drain")])
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        router.close()
        ctx.term()
        for name in os.listdir(sockdir):
            os.unlink(os.path.join(sockdir, name))
        os.rmdir(sockdir)
    lines = [line for line in stderr.read_text().splitlines() if "malformed" in line]
    assert len(lines) == len(bad), lines


@pytest.mark.parametrize(
    "task, words",
    [
        ("misbehave_garbage", "malformed msgpack"),
        ("misbehave_oversized", "over the 67108864-byte limit"),
    ],
)
def test_a_worker_that_breaks_the_protocol_mid_job_is_replaced_and_the_job_gets_a_protocol_error(config, task, words):
    with Supervisor(config()) as sup:
        first = sup.switch_mode("f").result(T)["pid"]
        before = sup.submit("echo", "before")
        bad = sup.submit(task)
        after = sup.submit("echo", "after")
        assert before.result(T) == "before"
        with pytest.raises(ProtocolError, match=words):
            bad.result(T)
        assert after.result(T) == "after", "the queue is untouched and served by a new worker"
        assert sup.submit("pid").result(T) != first, "the worker that broke the protocol was replaced"
        assert pid_gone(first)
        assert sup.status()["restarts"] == 1


def test_a_frame_over_libzmqs_limit_drops_the_connection_and_the_worker_exits_so_the_job_ends(config):
    """Above MAXMSGSIZE libzmq drops the connection without a word; the
    worker's rule (exit 4 on a lost connection) is what gives the job its
    outcome instead of a hang."""
    with Supervisor(config()) as sup:
        first = sup.switch_mode("f").result(T)["pid"]
        with pytest.raises(WorkerCrashed, match="exited with code 4 .*lost its connection"):
            sup.submit("misbehave_huge").result(T)
        assert sup.submit("echo", "after").result(T) == "after"
        assert pid_gone(first)


def test_an_error_map_with_any_keys_arrives_as_the_right_class(config):
    with Supervisor(config()) as sup:
        sup.switch_mode("f").result(T)
        err = sup.submit("misbehave_odd_error").exception(T)
        assert isinstance(err, JobFailed) and err.details == {"self": 1, "cls": "x"}
        assert sup.submit("add", {"a": 1, "b": 1}).result(T) == 2, "the same worker goes on"


def test_a_result_whose_header_reads_but_whose_value_does_not_fails_that_job_alone(config):
    """The worker kept to the protocol except for the value (a map with an
    array key): the job it answered fails with a ProtocolError, and the same
    worker goes on serving; nothing is restarted."""
    with Supervisor(config()) as sup:
        first = sup.switch_mode("f").result(T)["pid"]
        with pytest.raises(ProtocolError, match="result for job 1 .* cannot be read"):
            sup.submit("misbehave_tuple_key").result(T)
        assert sup.submit("pid").result(T) == first
        assert sup.status()["restarts"] == 0
