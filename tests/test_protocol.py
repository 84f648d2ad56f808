"""protocol/: typed encode/decode, limits, and errors as plain data."""

from __future__ import annotations

import pickle
import subprocess
import sys

import msgpack
import pytest

import protocol
from protocol import (
    ERROR_CODES,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    Drain,
    Failure,
    GpuvisorError,
    Heartbeat,
    Hello,
    Job,
    Load,
    LoadFailed,
    ProtocolError,
    Ready,
    Result,
    decode_from_worker,
    decode_to_worker,
    encode,
    encode_job,
    error_from_wire,
)

FROM_WORKER = [
    Hello(pid=123, gen=4),
    Ready(mode="diag", load_seconds=0.25, tasks=["echo", "pid"]),
    LoadFailed(mode="embed", error={"code": "mode_load_error", "message": "boom"}),
    Result(job=7, value={"nested": [1, 2.5, "three", b"four", None, True]}),
    Failure(job=8, error={"code": "job_failed", "message": "x", "traceback": "tb"}),
    Heartbeat(busy=True),
]
TO_WORKER = [Load(mode="diag", loader="worker.modes.diag:load", args={"a": 1}), Job(9, "echo", [1, 2]), Drain()]


@pytest.mark.parametrize("msg", FROM_WORKER, ids=lambda m: m.kind.value)
def test_worker_messages_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 1
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["v"] == PROTOCOL_VERSION and header["k"] == msg.kind.value
    assert decode_from_worker(frames) == msg


@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda m: m.kind.value)
def test_supervisor_messages_round_trip(msg):
    assert decode_to_worker(encode(msg)) == msg


def test_a_message_in_the_wrong_direction_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind 'job' from a worker"):
        decode_from_worker(encode(Job(1, "echo", None)))
    with pytest.raises(ProtocolError, match="unknown message kind 'hello' to a worker"):
        decode_to_worker(encode(Hello(1, 1)))


def _frame(obj) -> list[bytes]:
    return [msgpack.packb(obj, use_bin_type=True)]


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty message"),
        ([b"\x81"], "malformed msgpack"),  # truncated map
        ([b"\xc1"], "malformed msgpack"),  # the one byte msgpack never uses
        ([msgpack.packb({"v": 1}) + b"\x00"], "malformed msgpack"),  # trailing bytes
        ([b"\x91" * 100_000], "malformed msgpack"),  # nesting past msgpack's stack
        ([pickle.dumps({"v": 1, "k": "hello"})], "malformed msgpack"),
        (_frame([1, 2, 3]), "expected a map"),
        (_frame({"k": "hello", "pid": 1, "gen": 1}), "protocol version None"),
        (_frame({"v": 99, "k": "hello", "pid": 1, "gen": 1}), "protocol version 99"),
        (_frame({"v": 1, "k": "nonsense"}), "unknown message kind 'nonsense'"),
        (_frame({"v": 1, "k": 5}), "unknown message kind 5"),
        (_frame({"v": 1, "k": "hello", "pid": 1}), "lacks field 'gen'"),
        (_frame({"v": 1, "k": "hello", "pid": "1", "gen": 1}), r"hello.pid is str, expected int"),
        (_frame({"v": 1, "k": "hello", "pid": True, "gen": 1}), r"hello.pid is bool, expected int"),
        (_frame({"v": 1, "k": "ready", "mode": "m", "load_seconds": "x", "tasks": []}), "expected float"),
        (_frame({"v": 1, "k": "failure", "job": 1, "error": "text"}), "failure.error is str, expected dict"),
        (
            [msgpack.packb({"v": 1, "k": "heartbeat", "busy": False}), b"extra"],
            "frames \\[1\\] after the header are not referenced",
        ),
        ([msgpack.packb(msgpack.ExtType(42, b"data"))], "ext type 42"),
    ],
)
def test_malformed_input_is_a_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode_from_worker(frames)


def test_oversized_frames_are_refused_before_unpacking():
    big = [b"\x00" * (MAX_MESSAGE_BYTES + 1)]
    with pytest.raises(ProtocolError, match="over the"):
        decode_from_worker(big)
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        decode_to_worker(encode(Job(1, "echo", "x" * 200)), limit=100)


def test_a_payload_msgpack_cannot_carry_fails_at_encoding_and_never_falls_back_to_pickle():
    class Custom:
        pass

    with pytest.raises(TypeError, match="not msgpack-encodable"):
        encode_job(1, "echo", {"obj": Custom()})
    with pytest.raises(TypeError, match="not msgpack-encodable"):
        encode_job(1, "echo", {1, 2})
    with pytest.raises(TypeError, match="not msgpack-encodable"):
        encode_job(1, "echo", 2**70)


def test_a_payload_over_the_limit_fails_at_encoding():
    with pytest.raises(ProtocolError, match="header of 2.* bytes is over the 1000-byte frame limit"):
        encode_job(1, "echo", b"x" * 2000, limit=1000)


def _all_error_classes():
    seen, todo = [], [GpuvisorError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in seen if c.__module__ == "protocol.errors"]


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_crosses_the_wire_as_the_same_class(cls):
    err = cls("something happened", traceback="Traceback ...", remote_type="ValueError")
    wire = msgpack.unpackb(msgpack.packb(err.to_wire()), raw=False)
    back = error_from_wire(wire)
    assert type(back) is cls
    assert back.message == "something happened"
    assert back.details["traceback"] == "Traceback ..."


def test_error_codes_are_unique_and_stable():
    classes = _all_error_classes()
    assert len({c.code for c in classes}) == len(classes)
    # Renaming a code breaks peers in other languages: this list is the contract.
    assert ERROR_CODES == {
        "error", "protocol_error", "unknown_mode", "no_mode_loaded", "unknown_task", "mode_load_error",
        "job_failed", "out_of_memory", "job_timeout", "worker_crashed", "job_cancelled", "shutting_down", "supervisor_failed", "queue_full", "daemon_unavailable",
    }  # fmt: skip


def test_an_unknown_or_malformed_error_map_still_becomes_an_error():
    unknown = error_from_wire({"code": "from_the_future", "message": "hi"})
    assert type(unknown) is GpuvisorError and "from_the_future" in str(unknown)
    assert isinstance(error_from_wire("not a map"), ProtocolError)
    assert isinstance(error_from_wire({"code": 1}), ProtocolError)


def test_protocol_is_a_leaf_package():
    code = "import sys, protocol; print(sorted(m for m in sys.modules if m.split('.')[0] in ('supervisor', 'worker', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_all_errors_are_importable_from_supervisor():
    import supervisor

    for name in ("GpuvisorError", "WorkerCrashed", "JobFailed", "JobTimeout", "ModeLoadError", "UnknownMode",
                 "UnknownTask", "ShuttingDown", "JobCancelled", "ProtocolError"):  # fmt: skip
        assert getattr(supervisor, name) is getattr(protocol, name)


def test_an_error_map_may_carry_any_key_even_self():
    err = error_from_wire({"code": "job_failed", "message": "m", "self": 1, "message2": "x", "cls": 2})
    assert type(err) is protocol.JobFailed and err.details == {"self": 1, "message2": "x", "cls": 2}


def test_a_boolean_version_is_not_version_1():
    with pytest.raises(ProtocolError, match="protocol version True"):
        decode_from_worker(_frame({"v": True, "k": "heartbeat", "busy": False}))
