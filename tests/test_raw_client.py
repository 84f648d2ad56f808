"""The real daemon (`gpuvisor serve` in a subprocess), driven by RawClient: a
client written from docs/protocol.md part 2 alone. Nothing here imports the
project's supervisor, protocol or worker packages."""

from __future__ import annotations

import contextlib
import random
import time

import msgpack
import pytest
import zmq

from tests.helpers import ROOT, T, wait_until
from tests.helpers.daemon import RunningDaemon
from tests.helpers.raw_client import RawClient, error, value

pytestmark = pytest.mark.daemon

STATUS_FIELDS = {
    "state",
    "mode",
    "worker_state",
    "worker_pid",
    "generation",
    "queued",
    "in_flight",
    "restarts",
    "jobs_done",
    "switching_to",
    "last_error",
    "failed_reason",
    "config",
    "daemon_pid",
    "endpoint",
    "modes",
}


@pytest.fixture
def daemon():
    """A started daemon on a private ipc endpoint, stopped after the test by
    a raw ``shutdown`` (then a bounded wait, then a kill)."""
    d = RunningDaemon(cwd=str(ROOT))
    try:
        yield d
    finally:
        if d.running():
            with RawClient(d.endpoint, timeout=5.0) as c, contextlib.suppress(TimeoutError):
                c.call("shutdown", drain=False)
            with contextlib.suppress(AssertionError):
                d.wait()
        d.close()


@pytest.fixture
def client(daemon):
    c = RawClient(daemon.endpoint, timeout=10.0)
    yield c
    c.close()


@pytest.fixture
def diag(client):
    """A client whose daemon has the diag mode loaded."""
    v = value(client.call("switch", mode="diag"))
    assert v["mode"] == "diag" and v["status"] == "loaded"
    return client


def test_ping(daemon, client):
    reply = client.call("ping", id="p")
    assert reply["v"] == 1 and reply["k"] == "reply" and reply["id"] == "p" and reply["ok"] is True
    assert reply["value"] == {"pong": True, "pid": daemon.proc.pid, "version": 1}


def test_ping_is_answered_while_a_job_runs(diag):
    """The pong comes before the job's reply: an order, not a timing."""
    job = diag.send("submit", task="sleep", payload={"seconds": 3})
    assert value(diag.call("ping"))["pong"] is True
    assert not any(reply.get("id") == job for reply in diag._backlog), "the job ended before the ping was answered"
    assert value(diag.wait_for(job)) == {"slept": 3}


def test_switch_then_echo(client):
    first = value(client.call("switch", mode="diag"))
    assert first["mode"] == "diag" and first["status"] == "loaded"
    assert isinstance(first["pid"], int) and not isinstance(first["pid"], bool)
    for key in ("previous", "seconds", "load_seconds"):  # the section 11 example
        assert key in first
    again = value(client.call("switch", mode="diag"))
    assert again["mode"] == "diag" and again["status"] == "already_loaded" and again["pid"] == first["pid"]

    payload = {"x": 1, 2: b"\x00\xff", "nested": [1.5, None, True, "s", {"k": -7}], "t": msgpack.Timestamp(1, 5)}
    assert value(client.call("submit", task="echo", payload=payload)) == payload
    # optional fields left out or sent as nil
    assert value(client.call("submit", task="echo", payload=None, mode=None, timeout=None, retries=0)) is None
    assert value(client.call("submit", task="echo")) is None
    assert value(client.call("submit", task="echo", payload="m", mode="diag")) == "m"


def test_pipelining_50_submits(diag):
    ids = [n if n % 2 else f"job-{n}" for n in range(50)]
    payloads = {i: {"n": n, "tag": str(i), "blob": bytes([n]) * (n + 1)} for n, i in enumerate(ids)}
    for i in ids:
        assert diag.send("submit", id=i, task="echo", payload=payloads[i]) == i
    got: dict = {}
    deadline = time.monotonic() + 30.0
    while len(got) < len(ids):
        reply = diag.recv(max(0.0, deadline - time.monotonic()))
        rid = reply["id"]
        assert rid in payloads, f"reply for an id never sent: {reply!r}"
        assert rid not in got, f"second reply for id {rid!r}"
        got[rid] = reply
    for i in ids:
        assert type(got[i]["id"]) is type(i)
        assert value(got[i]) == payloads[i]
    with pytest.raises(TimeoutError):  # exactly one reply per request
        diag.recv(0.3)


def test_int_and_str_ids_are_distinct(client):
    client.send("ping", id=3)
    client.send("ping", id="3")
    replies = [client.recv(), client.recv()]
    assert sorted(repr(r["id"]) for r in replies) == ["'3'", "3"]


def test_error_replies(diag):
    err = error(diag.call("submit", task="no-such-task", payload=None))
    assert err["code"] == "unknown_task"
    err = error(diag.call("submit", task="fail", payload=None))
    assert err["code"] == "job_failed"
    assert isinstance(err.get("remote_type", ""), str) and isinstance(err.get("traceback", ""), str)
    err = error(diag.call("submit", task="echo", payload=None, mode="no-such-mode"))
    assert err["code"] == "unknown_mode"
    err = error(diag.call("switch", mode="no-such-mode"))
    assert err["code"] == "unknown_mode"
    # the daemon still serves after errors
    assert value(diag.call("submit", task="echo", payload=5)) == 5


def test_job_timeout(diag):
    err = error(diag.call("submit", task="sleep", payload={"seconds": 2}, timeout=0.5))
    assert err["code"] == "job_timeout"
    assert value(diag.call("submit", task="echo", payload="after")) == "after"


def test_malformed_requests(client):
    rng = random.Random(1234)
    # not msgpack at all (0xc1 is never valid msgpack)
    client.send_raw(b"\xc1" + rng.randbytes(64))
    reply = client.recv()
    assert reply["id"] is None and error(reply)["code"] == "protocol_error"
    bad = [
        (msgpack.packb([1, 2, 3]), None),  # not a map
        (msgpack.packb({"v": 1, "k": "ping"}), None),  # no id
        (msgpack.packb({"v": 1, "k": "ping", "id": True}), None),  # mistyped id
        (msgpack.packb({"v": 1, "k": "ping", "id": 1.5}), None),  # mistyped id
        (msgpack.packb({"v": 1, "k": "no-such-kind", "id": "u"}), "u"),
        (msgpack.packb({"v": 2, "k": "ping", "id": 7}), 7),  # wrong version
        (msgpack.packb({"k": "ping", "id": 8}), 8),  # no version
        (msgpack.packb({"v": 1, "id": 9}), 9),  # no kind
        (msgpack.packb({"v": 1, "k": "switch", "id": 10}), 10),  # missing field
        (msgpack.packb({"v": 1, "k": "submit", "id": 11, "task": 5}), 11),  # mistyped field
        (msgpack.packb({"v": 1, "k": "submit", "id": 12, "task": "echo", "retries": True}), 12),  # bool for int
        (msgpack.packb({"v": 1, "k": "shutdown", "id": 13, "drain": "yes"}), 13),
        (msgpack.packb({"v": 1, "k": "cancel", "id": 14}), 14),
        # an ext type (other than the timestamp and the array reference) is refused, under the request's id
        (msgpack.packb({"v": 1, "k": "ping", "id": 15, "x": msgpack.ExtType(5, b"z")}), 15),
    ]
    for frame, expected_id in bad:
        client.send_raw(frame)
        reply = client.recv()
        assert reply["id"] == expected_id and type(reply["id"]) is type(expected_id), (frame, reply)
        assert error(reply)["code"] == "protocol_error", (frame, reply)
    # and the connection still works
    assert value(client.call("ping"))["pong"] is True


def test_malformed_random_bytes(client):
    rng = random.Random(99)
    for _ in range(20):
        client.send_raw(b"\xc1" + rng.randbytes(rng.randrange(0, 200)))
        reply = client.recv()
        assert reply["id"] is None
        assert error(reply)["code"] == "protocol_error"
    assert value(client.call("ping"))["pong"] is True


def test_cancel_a_queued_job(diag):
    sleeper = diag.send("submit", id="sleep", task="sleep", payload={"seconds": 2})
    # status "window" jobs are handed to the worker at once (they count as running):
    # fill the window so that the next one waits in the queue.
    for n in range(value(diag.call("status"))["window"] - 1):
        diag.send("submit", id=f"fill{n}", task="echo", payload=n)
    echo = diag.send("submit", id="echo", task="echo", payload="never")
    cancel = diag.send("cancel", id="cancel", target=echo)
    assert value(diag.wait_for(cancel, 1.5)) == {"cancelled": True}
    assert error(diag.wait_for(echo, 1.5))["code"] == "job_cancelled"
    assert value(diag.wait_for(sleeper, 10.0)) is not None
    # a finished (or unknown) target is no longer queued
    assert value(diag.call("cancel", target=echo)) == {"cancelled": False}
    assert value(diag.call("cancel", target="never-sent")) == {"cancelled": False}


def test_status_fields(daemon, diag):
    st = value(diag.call("status"))
    assert STATUS_FIELDS <= set(st), STATUS_FIELDS - set(st)
    assert st["state"] == "running"
    assert st["mode"] == "diag"
    assert st["daemon_pid"] == daemon.proc.pid
    assert st["endpoint"] == daemon.endpoint
    assert "diag" in st["modes"]
    for key in ("generation", "queued", "in_flight", "restarts", "jobs_done"):
        assert isinstance(st[key], int) and not isinstance(st[key], bool), (key, st[key])


def test_shutdown_with_drain(daemon, diag):
    job = diag.send("submit", id="last", task="sleep", payload={"seconds": 0.5})
    queued = diag.send("submit", id="queued", task="echo", payload="drained")
    reply = diag.call("shutdown", drain=True)
    assert value(reply) == {"stopping": True, "drain": True}
    assert error(diag.call("submit", task="echo", payload=1))["code"] == "shutting_down"
    assert value(diag.wait_for(job)) is not None
    assert value(diag.wait_for(queued)) == "drained"
    assert daemon.wait() == 0


def test_shutdown_without_drain(daemon, diag):
    running = diag.send("submit", id="running", task="sleep", payload={"seconds": 1})
    queued = diag.send("submit", id="queued", task="echo", payload="dropped")
    wait_until(lambda: value(diag.call("status"))["in_flight"] >= 1, T, "a job to be in flight")
    assert value(diag.call("shutdown", drain=False)) == {"stopping": True, "drain": False}
    assert error(diag.wait_for(queued))["code"] == "job_cancelled"
    assert error(diag.wait_for(running))["code"] == "job_cancelled"  # observed; doc 9 names only queued jobs
    assert daemon.wait() == 0


def test_req_socket(daemon):
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(daemon.endpoint)
        req.send(msgpack.packb({"v": 1, "k": "ping", "id": "req"}))
        assert req.poll(3000), "no reply to a REQ client"
        assert msgpack.unpackb(req.recv())["value"]["pong"] is True
    finally:
        req.close(0)
        ctx.term()


def test_a_request_whose_arrays_cannot_be_read_is_answered_under_its_id(daemon):
    """Not from the doc-built client (it only sends what the doc allows): a
    broken array reference must still get its one reply, under its id (the
    daemon forwards a payload as it came; the worker finds it broken)."""
    bad = msgpack.ExtType(1, msgpack.packb([2, "<f4", [1]]))  # frame 2 of 1
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        sock.send_multipart(
            [
                msgpack.packb({"v": 1, "k": "submit", "id": 77, "task": "echo", "mode": "diag", "payload": bad}),
                b"\0" * 4,
            ]
        )
        assert sock.poll(30_000), "no reply"
        reply = msgpack.unpackb(sock.recv_multipart()[0])
    assert reply["id"] == 77 and reply["ok"] is False and reply["error"]["code"] == "protocol_error"
