"""Fuzzing both ends of the worker socket with thousands of random and
mutated frames while real jobs keep succeeding. Seeded, so a failure
replays; the figures go to the test's output (``pytest -s``)."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import threading

import msgpack
import pytest
import zmq

from protocol import (
    MAX_MESSAGE_BYTES,
    Drain,
    Failure,
    Heartbeat,
    Job,
    Load,
    ProtocolError,
    Result,
    decode_to_worker,
    encode,
)
from supervisor import Supervisor
from tests.helpers import T
from tests.helpers.config import DIAG
from tests.helpers.harness import Harness

pytestmark = pytest.mark.process

SEED = 20261124
FUZZ_FRAMES = 3000
REAL_JOB_ID = 10**12  # real jobs' ids; a mutated frame that happens to be a valid JOB gets a small one

_VALID = [
    encode(Job(7, "echo", {"x": [1, 2, 3], "s": "text"}))[0],
    encode(Job(8, "sleep", {"seconds": 0}))[0],
    encode(Load("diag", DIAG, {}))[0],
    encode(Drain())[0],
    msgpack.packb({"v": 1, "k": "job", "job": 9, "task": "pid", "payload": None}),
]
_HUGE_DECLARED = [
    b"\xdb\xff\xff\xff\xff" + b"abc",  # str32 claiming 4 GiB
    b"\xc6\x7f\xff\xff\xff" + b"\x00" * 8,  # bin32 claiming 2 GiB
    b"\xdd\xff\xff\xff\xff\x01",  # array32 claiming 4 G items
    b"\xdf\xff\xff\xff\xff\x01\x02",  # map32 claiming 4 G pairs
    b"\x85\xa1v\x01\xa1k\xa3job\xa3job\x01\xa4task\xdb\xff\xff\xff\xf0e",  # a JOB whose task claims 4 GiB
]
_RANDOM_VALUES = [None, True, 0, -1, 2**63, 1.5, "", "job", b"\x00", [], {}, [1, [2]], {"a": {"b": None}}]


def _random_map(rng: random.Random) -> dict:
    kinds = ["job", "load", "drain", "hello", "result", "", "JOB", "x" * 300]
    m = {"v": rng.choice([1, 1, 1, 0, 2, "1", None, True]), "k": rng.choice(kinds)}
    for key in rng.sample(["job", "task", "payload", "mode", "loader", "args", "extra", ""], rng.randrange(0, 6)):
        m[key] = rng.choice(_RANDOM_VALUES)
    return m


def fuzz_frames(rng: random.Random):
    """Yield multipart messages: random bytes, mutations of valid messages,
    schema-breaking maps, deep nesting, huge declared lengths, pickles, ext
    types, extra frames."""
    while True:
        shape = rng.randrange(10)
        if shape == 0:
            yield [rng.randbytes(rng.randrange(0, 300))]
        elif shape in (1, 2, 3):  # mutate a valid frame: flip, cut, splice
            frame = bytearray(rng.choice(_VALID))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                if op == 0 and frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
                elif op == 1 and frame:
                    del frame[rng.randrange(len(frame)) :]
                else:
                    frame[rng.randrange(len(frame) + 1) : 0] = rng.randbytes(rng.randrange(1, 8))
            yield [bytes(frame)]
        elif shape == 4:
            yield [msgpack.packb(_random_map(rng), use_bin_type=True)]
        elif shape == 5:
            depth = rng.choice([10, 1000, 100_000])
            yield [b"\x91" * depth + b"\xc0"]
        elif shape == 6:
            yield [rng.choice(_HUGE_DECLARED)]
        elif shape == 7:
            yield [pickle.dumps({"v": 1, "k": "job", "job": 1, "task": "echo", "payload": "pickled"})]
        elif shape == 8:
            ext = msgpack.ExtType(rng.randrange(0, 128), rng.randbytes(4))
            yield [msgpack.packb({"v": 1, "k": "job", "job": 1, "task": "echo", "payload": ext})]
        else:
            yield [rng.choice(_VALID[:2]), rng.randbytes(rng.randrange(0, 20))]


def test_the_worker_survives_thousands_of_bad_frames_and_keeps_serving():
    rng = random.Random(SEED)
    log = tempfile.NamedTemporaryFile(prefix="gpuvisor-fuzz-", suffix=".log", delete=False)
    h = Harness(stderr=log)
    try:
        assert h.recv().kind.value == "hello"
        h.send(Load("diag", DIAG, {}))
        assert h.recv().kind.value == "ready"
        sent_bad = valid_jobs = real_ok = 0
        gen = fuzz_frames(rng)
        stray: dict[int, object] = {}
        while sent_bad + valid_jobs < FUZZ_FRAMES:
            frames = next(gen)
            try:
                msg = decode_to_worker(frames)
            except ProtocolError:
                sent_bad += 1
            else:
                if not isinstance(msg, Job):
                    continue  # a mutation that is a valid LOAD or DRAIN is not a bad frame
                valid_jobs += 1
            h.send_raw(*frames)
            if (sent_bad + valid_jobs) % 25 == 0:  # a real job, and its right answer
                job_id = REAL_JOB_ID + real_ok
                h.send(Job(job_id, "echo", {"n": real_ok}))
                while True:
                    answer = h.recv()
                    if isinstance(answer, (Result, Failure)) and answer.job == job_id:
                        break
                    stray[answer.job] = answer
                assert answer == Result(job_id, {"n": real_ok})
                real_ok += 1
        h.send_raw(b"\x00" * (MAX_MESSAGE_BYTES + 1))  # one frame over the size limit
        sent_bad += 1
        h.send(Job(REAL_JOB_ID - 1, "pid", None))
        while not isinstance(answer := h.recv(), Result) or answer.job != REAL_JOB_ID - 1:
            pass
        assert answer.value == h.proc.pid, "the same worker process served throughout"
        h.send(Drain())
        assert h.proc.wait(T) == 0
    finally:
        h.close()
        log.close()
    text = open(log.name, encoding="utf-8", errors="replace").read()
    os.unlink(log.name)
    logged = len(re.findall(r"dropped a malformed message", text))
    assert logged == sent_bad, f"{sent_bad} bad frames, {logged} log lines"
    print(
        f"\nfuzz (worker side): {sent_bad} malformed frames, {logged} log lines, {valid_jobs} mutated-but-valid jobs "
        f"answered, {real_ok + 1} real jobs all correct, same worker pid, drained with exit 0"
    )


def test_the_supervisor_survives_a_rogue_peer_on_its_worker_socket(caplog):
    """Peers that are not the current worker (any other routing id, a
    duplicate of the worker's own, random bytes, a frame over libzmq's
    limit) change nothing: real jobs all succeed on the same worker."""
    rng = random.Random(SEED + 1)
    with Supervisor() as sup:
        sup.switch_mode("diag").result(T)
        pid = sup.submit("pid").result(T)
        endpoint = sup._engine.link.endpoint
        ctx = zmq.Context()
        rogues = []
        for identity in (b"g0", b"g1", b"", os.urandom(8), b"g999"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 1000)
            if identity:
                sock.setsockopt(zmq.ROUTING_ID, identity)
            sock.connect(endpoint)
            rogues.append(sock)
        stop = threading.Event()
        sent = 0

        def rogue_traffic():
            nonlocal sent
            gen = fuzz_frames(rng)
            valid_heartbeat = encode(Heartbeat(False))[0]
            forged_result = encode(Result(1, "forged"))[0]
            n = 0
            while not stop.is_set() and n < 20_000:
                n += 1
                frames = next(gen) if n % 3 else [rng.choice([valid_heartbeat, forged_result])]
                try:
                    rng.choice(rogues).send_multipart(frames)
                    sent += 1
                except zmq.Again:
                    pass
                if n % 50 == 0:
                    stop.wait(0.002)  # let real jobs through between bursts
            rogues[0].send(b"\x00" * (MAX_MESSAGE_BYTES + 8192))  # past MAXMSGSIZE: libzmq drops that peer
            sent += 1

        traffic = threading.Thread(target=rogue_traffic)
        traffic.start()
        try:
            real = [(i, sup.submit("echo", i)) for i in range(300)]
            for _, f in real:
                f.result(T)
        finally:
            stop.set()
            traffic.join(T)
            for sock in rogues:
                sock.close()
            ctx.term()
        assert all(f.result(T) == i for i, f in real)
        assert sup.submit("pid").result(T) == pid and sup.status()["restarts"] == 0
        dropped = sum("not the current worker" in r.getMessage() for r in caplog.records)
        print(
            f"\nfuzz (supervisor side): {sent} frames from 5 rogue peers, {dropped} dropped with a log line, "
            f"{len(real)} real jobs all correct, worker never replaced"
        )
        assert dropped > 0
