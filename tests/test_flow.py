"""Flow control between ``gpuvisor serve`` and its clients: a client that
reads gets every reply and chunk, in order; one that does not is cut off and
told so when it reads again; a flood from one client neither starves the
others nor delays SIGTERM; a stderr nobody reads wedges nothing. Real
daemons, a real ``Client``, raw DEALERs, and a small fake daemon (a ROUTER
in the test) for what a real daemon never sends: a gap in a stream, a reply
that cannot be decoded, a cut-off notice on cue."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import msgpack
import pytest
import zmq

from protocol import ClientCutOff, ModeLoadError, ProtocolError, StreamIncomplete
from supervisor.client import Client
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG, config_text


def raw_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, T * 1000)
    sock.connect(endpoint)
    return sock


def ping(request_id: int) -> bytes:
    return msgpack.packb({"v": 1, "k": "ping", "id": request_id})


class Flooder(threading.Thread):
    """Sends pings on its own DEALER as fast as libzmq takes them, and never
    reads, until stopped; the socket is the test's again after ``stop()``."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        super().__init__(daemon=True)
        self.sock = raw_dealer(ctx, endpoint)
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.sock.send(ping(self.sent), zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                time.sleep(0.001)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(T)


# ---------------------------------------------------------------- every reply, every chunk


@pytest.mark.daemon
def test_every_future_settles_when_20000_jobs_fail_at_once(daemon):
    broken = {"loader": "tests.helpers.loaders:sleeps_then_raises", "args": {"seconds": 2.0}}
    d = daemon(
        config_text=config_text(
            {"broken": broken, "diag": DIAG}, supervisor={"max_queue": 50000, "max_queue_per_client": 50000}
        )
    )
    with d.client() as c:
        futures = [c.submit("echo", i, mode="broken") for i in range(20_000)]
        wait_until(lambda: all(f.done() for f in futures), T * 2, "every one of 20,000 futures to settle")
        errors = {type(f.exception()) for f in futures}
        assert errors == {ModeLoadError}, errors
        assert c.ping()["pong"] is True
        assert c.status()["clients"]["dropped"] == 0


@pytest.mark.daemon
def test_a_long_stream_arrives_complete_and_in_order(daemon):
    d = daemon(config_text=config_text())
    n = 100_000
    with d.client() as c:
        stream = c.submit("count", {"n": n}, mode="diag", stream=True)
        chunks = list(stream)  # the client checks each chunk's seq: a gap would raise StreamIncomplete here
        assert len(chunks) == n and chunks == list(range(n))
        assert stream.result(T) == {"count": n}


# ---------------------------------------------------------------- a client that does not read


@pytest.fixture
def flooded(daemon):
    """A daemon serving diag, and a Flooder aimed at it, not started yet;
    the flooder is stopped and closed after the test, before the daemon."""
    d = daemon(config_text=config_text())
    ctx = zmq.Context()
    flooder = Flooder(ctx, d.endpoint)
    yield d, flooder
    flooder.stop()
    flooder.sock.close()
    ctx.term()


@pytest.mark.daemon
def test_a_flooder_that_never_reads_is_cut_off_alone_and_told_when_it_reads(flooded):
    d, flooder = flooded
    with d.client() as other:
        other.switch_mode("diag").result(T)
        flooder.start()
        served = 0

        def cut_off_while_serving_the_other() -> bool:
            nonlocal served
            assert other.submit("echo", served).result(T) == served
            served += 1
            return other.status()["clients"]["cut_off"] >= 1

        wait_until(cut_off_while_serving_the_other, T, "the flooder to be cut off")
        flooder.stop()
        assert served >= 1
        wait_until(lambda: "cut off client" in d.output(), T, "the daemon to log the cut-off")
        sock = flooder.sock
        replies = []
        while True:  # what was already on its way, then the notice
            reply = msgpack.unpackb(sock.recv(), raw=False)
            replies.append(reply)
            if reply["id"] is None:
                break
        assert reply["ok"] is False and reply["error"]["code"] == "client_cut_off", reply
        assert "open a new connection" in reply["error"]["message"]
        assert all(r["ok"] and r["value"]["pong"] for r in replies[:-1])
        assert len(replies) - 1 < flooder.sent
        sock.send(ping(-1))  # nothing more is served on that connection: each request is refused
        while True:  # (after the pings it sent before it stopped, which are refused too)
            refused = msgpack.unpackb(sock.recv(), raw=False)
            assert refused["ok"] is False and refused["error"]["code"] == "client_cut_off", refused
            if refused["id"] == -1:
                break
        assert other.submit("echo", "still served").result(T) == "still served"
        assert d.output().count("cut off client") == 1


@pytest.mark.daemon
def test_sigterm_is_prompt_while_a_client_floods(flooded):
    d, flooder = flooded
    with d.client() as c:
        c.switch_mode("diag").result(T)
        flooder.start()
        wait_until(lambda: flooder.sent > 5000, T, "the flood to be under way")
        assert c.ping()["pong"] is True
    os.kill(d.proc.pid, signal.SIGTERM)
    assert d.wait() == 0


@pytest.mark.daemon
def test_a_daemon_whose_stderr_nobody_reads_still_answers_and_stops(daemon):
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:  # fill the pipe: every write the daemon makes to it now blocks
            os.write(write_end, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    try:
        d = daemon(config_text=config_text(), stderr=write_end)
        ctx = zmq.Context()
        raw = raw_dealer(ctx, d.endpoint)
        try:
            for i in range(3000):  # each is a warning line, and its reply waits unread
                raw.send(b"\xc1not msgpack %d" % i)
            with d.client() as c:
                assert c.ping()["pong"] is True
                assert c.submit("echo", "served", mode="diag").result(T) == "served"
                assert c.status()["state"] == "running"
        finally:
            raw.close()
            ctx.term()
        os.kill(d.proc.pid, signal.SIGTERM)
        assert d.wait() == 0
    finally:
        os.close(read_end)
        os.close(write_end)


# ---------------------------------------------------------------- the client, against a fake daemon


class FakeDaemon:
    """A ROUTER the test drives by hand: it reads the client's requests and
    sends whatever the test says."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, T * 1000)
        self.sock.bind(endpoint)

    def request(self) -> tuple[bytes, dict]:
        identity, header = self.sock.recv_multipart()
        return identity, msgpack.unpackb(header, raw=False)

    def send(self, identity: bytes, message: dict | bytes) -> None:
        frame = message if isinstance(message, bytes) else msgpack.packb(message, use_bin_type=True)
        self.sock.send_multipart([identity, frame])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def fake(tmp_path):
    f = FakeDaemon(f"ipc://{tmp_path}/fake.sock")
    yield f
    f.close()


def chunk(request_id: int, seq: int, value) -> dict:
    return {"v": 1, "k": "chunk", "id": request_id, "seq": seq, "value": value}


def reply(request_id, value=None, error: dict | None = None) -> dict:
    if error is not None:
        return {"v": 1, "k": "reply", "id": request_id, "ok": False, "error": error}
    return {"v": 1, "k": "reply", "id": request_id, "ok": True, "value": value}


@pytest.mark.process
def test_a_gap_in_a_stream_ends_it_with_StreamIncomplete_never_a_success(fake, tmp_path):
    with Client(f"ipc://{tmp_path}/fake.sock") as c:
        stream = c.submit("count", {"n": 3}, stream=True)
        who, req = fake.request()
        assert req["k"] == "submit" and req["stream"] is True
        for message in (chunk(req["id"], 1, "a"), chunk(req["id"], 3, "c"), chunk(req["id"], 4, "d"),
                        reply(req["id"], {"count": 3})):  # fmt: skip
            fake.send(who, message)
        got = []
        with pytest.raises(StreamIncomplete, match="chunk 3 came after chunk 1"):
            for item in stream:
                got.append(item)
        assert got == ["a"]
        with pytest.raises(StreamIncomplete):
            stream.result(T)
        again = c.submit("echo", 1)  # the rest of the broken job was ignored; the client goes on
        who, req = fake.request()
        fake.send(who, reply(req["id"], "fine"))
        assert again.result(T) == "fine"


@pytest.mark.process
def test_a_reply_that_cannot_be_decoded_fails_the_request_it_names(fake, tmp_path, caplog):
    with Client(f"ipc://{tmp_path}/fake.sock") as c:
        broken, unreadable = c.submit("echo", 1), c.submit("echo", 2)
        (who, first), (_, second) = fake.request(), fake.request()
        fake.send(who, {"v": 1, "k": "reply", "id": first["id"], "ok": "yes"})  # 'ok' is not a bool
        with pytest.raises(ProtocolError, match=f"reply to request {first['id']} cannot be decoded"):
            broken.result(T)
        fake.send(who, reply(None, error={"code": "protocol_error", "message": "could not read a request"}))
        fake.send(who, b"\xc1")  # not msgpack at all: names nothing
        wait_until(lambda: "could not read one of this client's requests" in caplog.text, T, "the nil-id reply's log")
        wait_until(lambda: "cannot be decoded and names no request" in caplog.text, T, "the undecodable frame's log")
        assert not unreadable.done()  # nothing says which request it was: it waits for its own reply
        fake.send(who, reply(second["id"], "late but right"))
        assert unreadable.result(T) == "late but right"


@pytest.mark.process
def test_a_cut_off_notice_fails_every_outstanding_request_and_the_client_goes_on_anew(fake, tmp_path):
    with Client(f"ipc://{tmp_path}/fake.sock") as c:
        futures = [c.submit("echo", i) for i in range(3)]
        stream = c.submit("count", {"n": 5}, stream=True)
        identities = {fake.request()[0] for _ in range(4)}
        assert len(identities) == 1
        (who,) = identities
        notice = {"code": "client_cut_off", "message": "the daemon stopped serving this connection"}
        fake.send(who, reply(None, error=notice))
        for f in futures:
            with pytest.raises(ClientCutOff, match="stopped serving"):
                f.result(T)
        with pytest.raises(ClientCutOff):
            list(stream)
        after = c.submit("echo", "again")
        new_who, req = fake.request()
        assert new_who != who, "the client should go on over a new connection"
        fake.send(new_who, reply(req["id"], "again"))
        assert after.result(T) == "again"


@pytest.mark.process
def test_errno_of_a_gone_client_is_what_flow_control_expects():
    """The daemon forgets a client on EHOSTUNREACH (ROUTER_MANDATORY to an
    unknown routing id); libzmq must still say exactly that."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(zmq.ZMQError) as info:
            router.send_multipart([b"nobody", b"x"], zmq.NOBLOCK)
        assert info.value.errno == errno.EHOSTUNREACH
    finally:
        router.close()
        ctx.term()
