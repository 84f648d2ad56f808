"""Payloads are checked the same way on both sides (issue 10, points 1-3).

msgpack's packer takes more than its decoder gives back: a tuple map key
packs as an array, which decodes as an unhashable list; an empty list packs
one level past the decoder's stack. Every sender now checks its own frames
with the receiver's decoder, so such a payload is refused where it is made
(``TypeError`` naming the path), and a message a receiver cannot decode,
made by hand, is still answered under its id. Each case runs through what a
user runs: ``Supervisor``, ``Client`` with a real ``gpuvisor serve``, a raw
ZeroMQ socket, and a real worker process driven as a supervisor would.
"""

from __future__ import annotations

import re

import msgpack
import pytest
import zmq

from protocol import Failure, Hello, Job, JobFailed, Load, Ready, Result
from supervisor import Supervisor
from tests.helpers import T
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import RunningDaemon
from tests.helpers.harness import Harness

ACCEPTED_LEVELS = 1023  # the deepest a field may nest: msgpack's decoder stops at 1,024, the message's map included
KEYS = "(keys must be str, int, float, bool, bytes or None)"


def nested(levels: int, inner=None) -> list:
    """A list ``levels`` lists deep; the innermost one holds ``inner`` (or
    nothing). ``nested(2) == [[]]``."""
    value: list = [] if inner is None else [inner]
    for _ in range(levels - 1):
        value = [value]
    return value


def levels_of(value) -> int:
    """How many lists deep ``value`` is, for a ``nested()`` value; walked in a
    loop, since comparing 1,023 levels would hit Python's recursion limit."""
    levels = 0
    while isinstance(value, list):
        levels += 1
        assert len(value) <= 1, "not a nested() value"
        if not value:
            break
        value = value[0]
    return levels


def issue_style_1023() -> list:
    """The list from the issue: ``x = []`` wrapped 1,023 times (1,024 lists)."""
    x: list = []
    for _ in range(1023):
        x = [x]
    return x


# (id, payload, the TypeError's words, or None where the payload travels)
PAYLOADS = [
    ("tuple_key", {(1, 2): "x"}, f"payload: a map key of type tuple cannot be sent: (1, 2) {KEYS}"),
    ("nested_tuple_key", [{"a": {(1,): 2}}], f"payload[0]['a']: a map key of type tuple cannot be sent: (1,) {KEYS}"),
    ("nested_1024", nested(ACCEPTED_LEVELS + 1), "payload: nested 1,024 levels deep; the wire carries at most 1,023"),
    ("issue_1023", issue_style_1023(), "payload: nested 1,024 levels deep; the wire carries at most 1,023"),
    ("nested_1023", nested(ACCEPTED_LEVELS), None),
    ("nested_1023_holding_an_int", nested(ACCEPTED_LEVELS, inner=7), None),
]


def assert_same(result, payload) -> None:
    if isinstance(payload, list):
        assert levels_of(result) == levels_of(payload) == ACCEPTED_LEVELS
        inner_result, inner_payload = result, payload
        for _ in range(ACCEPTED_LEVELS - 1):
            inner_result, inner_payload = inner_result[0], inner_payload[0]
        assert inner_result == inner_payload
    else:
        assert result == payload


@pytest.fixture(scope="module")
def diag_sup():
    """One supervisor for the whole module: every case must leave its
    worker serving, so sharing it is part of what is tested."""
    sup = Supervisor().start()
    sup.switch_mode("diag").result(T)
    yield sup
    sup.shutdown(drain=False)


@pytest.mark.process
@pytest.mark.parametrize("payload, words", [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS])
def test_submit_refuses_what_a_worker_could_not_decode_and_the_worker_serves_on(diag_sup, payload, words):
    sup = diag_sup
    pid = sup.submit("pid").result(T)
    if words is not None:
        with pytest.raises(TypeError, match=re.escape(words)):
            sup.submit("echo", payload)
    else:
        assert_same(sup.submit("echo", payload).result(T), payload)
    assert sup.submit("echo", {"still": "here"}).result(T) == {"still": "here"}
    assert sup.submit("pid").result(T) == pid
    assert sup.status()["restarts"] == 0


@pytest.mark.process
@pytest.mark.parametrize(
    "task, payload, words",
    [
        ("tuple_key", None, f"returned a result that cannot be sent: value: a map key of type tuple cannot be sent: (1, 2) {KEYS}"),
        ("nested_tuple_key", None, "returned a result that cannot be sent: value[0]['a']: a map key of type tuple"),
        ("too_deep", {"levels": ACCEPTED_LEVELS + 1}, "returned a result that cannot be sent: value: nested 1,024 levels deep"),
    ],
)  # fmt: skip
def test_a_result_the_supervisor_could_not_decode_fails_that_job_alone(supervisor_from, task, payload, words):
    sup = supervisor_from(config_text({"u": "tests.helpers.loaders:unsendable_results"}))
    sup.switch_mode("u").result(T)
    pid = sup.submit("pid").result(T)
    with pytest.raises(JobFailed, match=re.escape(words)):
        sup.submit(task, payload).result(T)
    assert levels_of(sup.submit("too_deep", {"levels": ACCEPTED_LEVELS}).result(T)) == ACCEPTED_LEVELS
    assert sup.submit("echo", "after").result(T) == "after"
    assert sup.submit("pid").result(T) == pid
    status = sup.status()
    assert status["restarts"] == 0 and status["state"] != "failed" and status["worker_pid"] == pid


@pytest.mark.process
def test_an_unsendable_chunk_ends_the_stream_with_job_failed_and_the_worker_serves_on(supervisor_from):
    sup = supervisor_from(config_text({"u": "tests.helpers.loaders:unsendable_results"}))
    pid = sup.submit("pid", mode="u").result(T)
    stream = sup.submit("tuple_key_chunk", None, mode="u", stream=True)
    words = "returned a chunk that cannot be sent: value: a map key of type tuple"
    with pytest.raises(JobFailed, match=re.escape(words)):
        stream.future.result(T)
    with pytest.raises(JobFailed):
        assert list(stream) == ["fine"]  # the chunk before it arrived; the iteration then raises
    assert sup.submit("pid", mode="u").result(T) == pid
    assert sup.status()["restarts"] == 0


# ------------------------------------------------------------ through the daemon


@pytest.fixture(scope="module")
def daemon():
    d = RunningDaemon()
    try:
        with d.client(timeout=T) as c:
            c.switch_mode("diag").result(T)
        yield d
    finally:
        d.close()


@pytest.mark.daemon
@pytest.mark.parametrize("payload, words", [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS])
def test_client_submit_refuses_what_the_daemon_could_not_decode(daemon, payload, words):
    with daemon.client(timeout=T) as c:
        pid = c.submit("pid").result(T)
        if words is not None:
            with pytest.raises(TypeError, match=re.escape(words)):
                c.submit("echo", payload)
        else:
            assert_same(c.submit("echo", payload).result(T), payload)
        assert c.submit("echo", {"still": "here"}).result(T) == {"still": "here"}
        assert c.submit("pid").result(T) == pid
        assert c.status()["restarts"] == 0


def _request(**fields) -> dict:
    return {"v": 1, "k": "submit", "mode": "diag", **fields}


def _deep_first(request_id: int) -> bytes:
    """A submit map whose payload, nested past any decoder's stack, comes
    before its id: plain msgpack will not even pack it, so built by hand."""
    return (
        b"\x85"
        + msgpack.packb("v") + msgpack.packb(1)
        + msgpack.packb("k") + msgpack.packb("submit")
        + msgpack.packb("payload") + b"\x91" * 5000 + b"\x90"
        + msgpack.packb("task") + msgpack.packb("echo")
        + msgpack.packb("id") + msgpack.packb(request_id)
    )  # fmt: skip


UNHASHABLE = "malformed msgpack: a map key is an array, a map or an array reference"
TOO_DEEP = "malformed msgpack: nested deeper than 1,024 levels"
HAND_PACKED = [
    ("tuple_key", lambda rid: msgpack.packb(_request(id=rid, task="echo", payload={(1, 2): "x"})), UNHASHABLE),
    ("nested_tuple_key", lambda rid: msgpack.packb(_request(id=rid, task="echo", payload=[{"a": {(1,): 2}}])), UNHASHABLE),
    ("tuple_key_before_the_id", lambda rid: msgpack.packb({"payload": {(1, 2): "x"}, **_request(id=rid, task="echo")}), UNHASHABLE),
    ("nested_past_the_stack_before_the_id", _deep_first, TOO_DEEP),
]  # fmt: skip


@pytest.mark.daemon
@pytest.mark.parametrize("make, words", [h[1:] for h in HAND_PACKED], ids=[h[0] for h in HAND_PACKED])
def test_a_hand_packed_request_the_daemon_cannot_decode_gets_one_error_reply_under_its_id(daemon, make, words):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(daemon.endpoint)
        sock.send(make(4242))
        sock.send(msgpack.packb({"v": 1, "k": "ping", "id": "after"}))
        replies = []
        while {r.get("id") for r in replies} != {4242, "after"}:  # a payload is read by the worker, after the ping
            assert sock.poll(T * 1000), f"no reply within {T}s; got {replies}"
            replies.append(msgpack.unpackb(sock.recv(), raw=False))
        bad = [r for r in replies if r.get("id") == 4242]
        assert len(replies) == 2 and len(bad) == 1, replies
        assert bad[0]["ok"] is False and bad[0]["error"]["code"] == "protocol_error", bad
        assert words in bad[0]["error"]["message"], bad
    finally:
        sock.close()
        ctx.term()
    with daemon.client(timeout=T) as c:
        assert c.submit("echo", "still serving").result(T) == "still serving"


# ------------------------------------------------------------ a worker alone


@pytest.mark.process
def test_a_hand_packed_job_the_worker_cannot_decode_gets_a_failure_under_its_id():
    h = Harness()
    try:
        assert h.recv() == Hello(pid=h.proc.pid, gen=1)
        h.send(Load("diag", DIAG, {}))
        assert isinstance(h.recv(), Ready)
        jobs = [
            (11, msgpack.packb({"v": 1, "k": "job", "job": 11, "task": "echo", "payload": {(1, 2): "x"}}), UNHASHABLE),
            (12, msgpack.packb({"v": 1, "k": "job", "payload": [{"a": {(1,): 2}}], "task": "echo", "job": 12}), UNHASHABLE),
            (13, b"\x84" + msgpack.packb("payload") + b"\x91" * 5000 + b"\x90"
                 + b"".join(msgpack.packb(x) for x in ("v", 1, "k", "job", "job", 13)), TOO_DEEP),
        ]  # fmt: skip
        for job_id, frame, words in jobs:
            h.send_raw(frame)
            failure = h.recv()
            assert isinstance(failure, Failure) and failure.job == job_id, failure
            assert failure.error["code"] == "protocol_error"
            assert failure.error["message"].startswith(f"the job message could not be read: {words}"), failure
            h.send(Job(job_id + 100, "echo", "next"))
            assert h.recv() == Result(job_id + 100, "next")
        assert h.proc.poll() is None
    finally:
        h.close()
