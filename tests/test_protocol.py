"""protocol/: typed encode/decode, limits, and errors as plain data."""

from __future__ import annotations

import pickle
import re

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
from protocol.messages import Cancel
from tests.helpers import run_python
from tests.helpers.config import DIAG

FROM_WORKER = [
    Hello(pid=123, gen=4),
    Ready(mode="diag", load_seconds=0.25, tasks=["echo", "pid"]),
    LoadFailed(mode="embed", error={"code": "mode_load_error", "message": "boom"}),
    Result(job=7, value={"nested": [1, 2.5, "three", b"four", None, True]}),
    Failure(job=8, error={"code": "job_failed", "message": "x", "traceback": "tb"}),
    Heartbeat(),
    Heartbeat({"allocated_bytes": 1}),
]
TO_WORKER = [Load(mode="diag", loader=DIAG, args={"a": 1}), Job(9, "echo", [1, 2]), Drain(), Cancel(9)]


@pytest.mark.unit
@pytest.mark.parametrize("msg", FROM_WORKER, ids=lambda m: m.kind.value)
def test_worker_messages_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 1
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["v"] == PROTOCOL_VERSION and header["k"] == msg.kind.value
    assert decode_from_worker(frames) == msg


@pytest.mark.unit
@pytest.mark.parametrize("msg", TO_WORKER, ids=lambda m: m.kind.value)
def test_supervisor_messages_round_trip(msg):
    assert decode_to_worker(encode(msg)) == msg


@pytest.mark.unit
def test_a_message_in_the_wrong_direction_is_refused():
    with pytest.raises(ProtocolError, match="unknown message kind 'job' from a worker"):
        decode_from_worker(encode(Job(1, "echo", None)))
    with pytest.raises(ProtocolError, match="unknown message kind 'hello' to a worker"):
        decode_to_worker(encode(Hello(1, 1)))
    with pytest.raises(ProtocolError, match="unknown message kind 'cancel' from a worker"):
        decode_from_worker(encode(Cancel(1)))


@pytest.mark.unit
def test_cancel_is_the_bytes_the_protocol_document_shows():
    frame = encode(Cancel(7))[0]
    assert frame == bytes.fromhex("83a17601a16ba663616e63656ca36a6f6207")  # docs/protocol.md, section 6
    for bad in ({"v": 1, "k": "cancel"}, {"v": 1, "k": "cancel", "job": True}, {"v": 1, "k": "cancel", "job": "7"}):
        with pytest.raises(ProtocolError, match="cancel"):
            decode_to_worker(_frame(bad))


def _frame(obj) -> list[bytes]:
    return [msgpack.packb(obj, use_bin_type=True)]


@pytest.mark.unit
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


@pytest.mark.unit
def test_oversized_frames_are_refused_before_unpacking():
    big = [b"\x00" * (MAX_MESSAGE_BYTES + 1)]
    with pytest.raises(ProtocolError, match="over the"):
        decode_from_worker(big)
    with pytest.raises(ProtocolError, match="over the 100-byte limit"):
        decode_to_worker(encode(Job(1, "echo", "x" * 200)), limit=100)


@pytest.mark.unit
def test_a_payload_msgpack_cannot_carry_fails_at_encoding_and_never_falls_back_to_pickle():
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"^payload\['obj'\]: an object of type Custom is not msgpack-encodable$"):
        encode_job(1, "echo", {"obj": Custom()})
    with pytest.raises(TypeError, match=r"^payload: an object of type set is not msgpack-encodable$"):
        encode_job(1, "echo", {1, 2})
    with pytest.raises(TypeError, match=r"^payload\[1\]: the integer 1180591620717411303424 is not msgpack-encodable"):
        encode_job(1, "echo", [0, 2**70])


@pytest.mark.unit
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


@pytest.mark.unit
@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_crosses_the_wire_as_the_same_class(cls):
    err = cls("something happened", traceback="Traceback ...", remote_type="ValueError")
    wire = msgpack.unpackb(msgpack.packb(err.to_wire()), raw=False)
    back = error_from_wire(wire)
    assert type(back) is cls
    assert back.message == "something happened"
    assert back.details["traceback"] == "Traceback ..."


@pytest.mark.unit
def test_error_codes_are_unique_and_stable():
    classes = _all_error_classes()
    assert len({c.code for c in classes}) == len(classes)
    # Renaming a code breaks peers in other languages: this list is the contract.
    assert ERROR_CODES == {
        "error", "protocol_error", "unknown_mode", "no_mode_loaded", "unknown_task", "mode_load_error",
        "job_failed", "out_of_memory", "job_timeout", "worker_crashed", "job_cancelled", "shutting_down", "supervisor_failed", "queue_full", "daemon_unavailable", "client_cut_off", "stream_incomplete",
        "mode_broken", "forbidden", "request_too_large", "wrong_device",
    }  # fmt: skip


@pytest.mark.unit
def test_an_unknown_or_malformed_error_map_still_becomes_an_error():
    unknown = error_from_wire({"code": "from_the_future", "message": "hi"})
    assert type(unknown) is GpuvisorError and "from_the_future" in str(unknown)
    assert isinstance(error_from_wire("not a map"), ProtocolError)
    assert isinstance(error_from_wire({"code": 1}), ProtocolError)


@pytest.mark.process
def test_protocol_is_a_leaf_package():
    code = "import sys, protocol; print(sorted(m for m in sys.modules if m.split('.')[0] in ('supervisor', 'worker', 'torch')))"
    out = run_python(code)
    assert out.stdout.strip() == "[]"


@pytest.mark.unit
def test_all_errors_are_importable_from_supervisor():
    import supervisor

    for name in ("GpuvisorError", "WorkerCrashed", "JobFailed", "JobTimeout", "ModeLoadError", "UnknownMode",
                 "UnknownTask", "ShuttingDown", "JobCancelled", "ProtocolError"):  # fmt: skip
        assert getattr(supervisor, name) is getattr(protocol, name)


@pytest.mark.unit
def test_an_error_map_may_carry_any_key_even_self():
    err = error_from_wire({"code": "job_failed", "message": "m", "self": 1, "message2": "x", "cls": 2})
    assert type(err) is protocol.JobFailed and err.details == {"self": 1, "message2": "x", "cls": 2}


@pytest.mark.unit
def test_a_boolean_version_is_not_version_1():
    with pytest.raises(ProtocolError, match="protocol version True"):
        decode_from_worker(_frame({"v": True, "k": "heartbeat", "busy": False}))


# ------------------------------------------------ one definition of what travels


def _random_value(rng, depth: int = 0):
    """A value of the kinds a caller might pass: scalars, lists, tuples and
    maps whose keys are sometimes tuples, now and then a chain nested near
    the decoder's limit."""
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice([None, True, 0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 1.5, "s", "ü", b"\x00", b""])
    if roll < 0.45:
        chain = rng.choice([[], {}, 1, {(1,): 1}, {"k": []}])
        for _ in range(rng.randint(1015, 1030)):
            chain = [chain]
        return chain
    if roll < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.75:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3)))
    keys = ["a", 1, -2, 2.5, None, True, b"k", (1,), (1, (2,)), ()]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.unit
def test_what_the_encoder_accepts_the_decoder_accepts_and_it_refuses_nothing_else():
    import random

    rng = random.Random(10)
    accepted = refused = 0
    for _ in range(400):
        payload = _random_value(rng)
        try:
            frames = encode_job(1, "echo", payload)
        except TypeError as exc:
            refused += 1
            assert str(exc).startswith("payload"), exc  # names the path
            try:  # and plain msgpack's bytes for it are what a receiver refuses
                plain = msgpack.packb({"v": 1, "k": "job", "job": 1, "task": "echo", "payload": payload})
            except (TypeError, ValueError):
                continue
            with pytest.raises(ProtocolError):
                decode_to_worker([plain])
            continue
        accepted += 1
        assert decode_to_worker(frames).job == 1
    assert accepted > 50 and refused > 50, (accepted, refused)


@pytest.mark.unit
@pytest.mark.parametrize(
    "payload, words",
    [
        ({(1, 2): "x"}, "payload: a map key of type tuple cannot be sent: (1, 2)"),
        ([{"a": {(1,): 2}}], "payload[0]['a']: a map key of type tuple cannot be sent: (1,)"),
        ({"a": [0, {"b": {("k",): 1}}]}, "payload['a'][1]['b']: a map key of type tuple"),
        ({"e": msgpack.ExtType(5, b"x")}, "payload['e']: msgpack ext type 5 cannot be sent"),
        ({"e": msgpack.ExtType(1, b"x")}, "payload['e']: a hand-made array reference (ext type 1) cannot be sent"),
    ],
)
def test_a_payload_no_receiver_could_decode_is_refused_naming_its_path(payload, words):
    with pytest.raises(TypeError, match=re.escape(words)):
        encode_job(1, "echo", payload)


@pytest.mark.unit
def test_nesting_is_refused_past_the_decoders_stack_with_the_depth_and_the_limit():
    def nested(levels):
        value: list = []
        for _ in range(levels - 1):
            value = [value]
        return value

    assert decode_to_worker(encode_job(1, "echo", nested(1023))).job == 1
    for levels in (1024, 1030):
        words = f"^payload: nested {levels:,} levels deep; the wire carries at most 1,023 in a message field"
        with pytest.raises(TypeError, match=words):
            encode_job(1, "echo", nested(levels))
    deep_key: object = {(1,): 1}
    for _ in range(600):
        deep_key = [deep_key]
    with pytest.raises(TypeError, match=re.escape("payload[0][0][0][0][0][0][0][0]…(589 more)…[0][0][0]: a map key")):
        encode_job(1, "echo", deep_key)
    cycle: list = [1]
    cycle.append({"back": cycle})
    with pytest.raises(TypeError, match=re.escape("payload[1]['back']: contains itself")):
        encode_job(1, "echo", cycle)


@pytest.mark.unit
def test_a_result_and_a_reply_are_checked_like_a_payload():
    with pytest.raises(TypeError, match=re.escape("value: a map key of type tuple")):
        encode(Result(1, {(1, 2): "x"}))
    from protocol.client import encode_reply

    reply = msgpack.unpackb(encode_reply(5, value={(1, 2): "x"})[0], raw=False)
    assert reply["id"] == 5 and reply["ok"] is False and reply["error"]["code"] == "protocol_error"
    assert "value: a map key of type tuple" in reply["error"]["message"]
    with pytest.raises(TypeError, match=re.escape("a map key of type tuple")):
        protocol.pack({"x": {(1,): 1}})


def _raw_map(*pairs: tuple[bytes, bytes]) -> bytes:
    """A msgpack map from already-packed keys and values (for values plain
    msgpack will not pack)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def _p(obj) -> bytes:
    return msgpack.packb(obj)


DEEP = b"\x91" * 5000 + b"\x90"


@pytest.mark.unit
@pytest.mark.parametrize(
    "frame, expected",
    [
        (_p({"payload": {(1, 2): "x"}, "id": 7}), 7),
        (_p({"id": "req-1", "payload": {(1, 2): "x"}}), "req-1"),
        (_raw_map((_p("payload"), DEEP), (_p("id"), _p(8))), 8),
        (_raw_map((DEEP, _p(1)), (_p([1, 2]), _p(2)), (_p("id"), _p(9))), 9),  # unreadable keys before it
        (_p({"payload": msgpack.ExtType(9, b"x"), "id": 10}), 10),
        (_p({"id": True}), None),
        (_p({"id": [1]}), None),
        (_p({**{f"k{i}": i for i in range(70)}, "id": 11}), None),  # past the entries read
        (_p({"id": 12})[:-1], None),  # truncated
        (_p([1, 2]), None),
        (b"\xc1", None),
        (b"", None),
        (_raw_map((_p("payload"), b"\xdd\xff\xff\xff\xff"), (_p("id"), _p(13))), None),  # claims 4G elements
        (_raw_map((_p("payload"), b"\x91" * 5000 + b"\xdd\xff\xff\xff\xff"), (_p("id"), _p(14))), None),
    ],
)
def test_peek_reads_an_id_whatever_else_the_header_holds(frame, expected):
    from protocol.messages import peek

    assert peek([frame], "id") == expected


@pytest.mark.unit
def test_peek_stays_bounded_on_a_large_header():
    from protocol.messages import peek

    frame = _p({"id": 3, **{f"k{i}": [i] * 10 for i in range(200_000)}})
    assert peek([frame], "id") == 3
    wide_and_deep = _raw_map((_p("payload"), b"\x91" * 2000 + _p(list(range(300_000)))), (_p("id"), _p(4)))
    assert peek([wide_and_deep], "id") is None  # over the scanning budget: given up, not hung
