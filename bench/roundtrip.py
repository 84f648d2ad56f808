"""No-op job round trip: gpuvisor against the floor of its own stack (a raw
pyzmq + msgpack echo between two processes) and against the standard
library's ProcessPoolExecutor and multiprocessing.Pipe."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import msgpack
import zmq

from bench.report import Row, median, percentile
from supervisor import AsyncSupervisor, Supervisor

N = 2000
WARMUP = 200

_ECHO = """
import sys, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.connect(sys.argv[1])
s.send(msgpack.packb({"k": "hello"}))
while True:
    m = msgpack.unpackb(s.recv())
    if m.get("k") == "stop": break
    s.send(msgpack.packb({"k": "result", "job": m["job"], "value": m["payload"]}))
s.close(); ctx.term()
"""


def raw_zmq_echo() -> list[float]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tempfile.mkdtemp()}/echo.sock"
    router.bind(endpoint)
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, endpoint])
    try:
        ident, _ = router.recv_multipart()
        samples = []
        for i in range(N + WARMUP):
            t = time.perf_counter()
            router.send_multipart([ident, msgpack.packb({"k": "job", "job": i, "task": "echo", "payload": None})])
            msgpack.unpackb(router.recv_multipart()[1])
            samples.append(time.perf_counter() - t)
        router.send_multipart([ident, msgpack.packb({"k": "stop"})])
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
        router.close()
        ctx.term()
    return samples[WARMUP:]


def _noop(x):
    return x


def pool_executor() -> list[float]:
    samples = []
    with ProcessPoolExecutor(1) as pool:
        for _ in range(N + WARMUP):
            t = time.perf_counter()
            pool.submit(_noop, None).result()
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


def _pipe_echo(conn):
    while (msg := conn.recv()) is not StopIteration:
        conn.send(msg)


def mp_pipe() -> list[float]:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_pipe_echo, args=(child,))
    proc.start()
    samples = []
    for _ in range(N + WARMUP):
        t = time.perf_counter()
        parent.send(None)
        parent.recv()
        samples.append(time.perf_counter() - t)
    parent.send(StopIteration)
    proc.join(30)
    return samples[WARMUP:]


def gpuvisor_sync() -> list[float]:
    samples = []
    with Supervisor() as sup:
        sup.switch_mode("diag").result(60)
        for _ in range(N + WARMUP):
            t = time.perf_counter()
            sup.submit("echo").result(60)
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


def gpuvisor_async() -> list[float]:
    async def main():
        samples = []
        async with AsyncSupervisor() as sup:
            await sup.switch_mode("diag")
            for _ in range(N + WARMUP):
                t = time.perf_counter()
                await sup.submit("echo")
                samples.append(time.perf_counter() - t)
        return samples[WARMUP:]

    return asyncio.run(main())


def run() -> list[Row]:
    raw = raw_zmq_echo()
    sync = gpuvisor_sync()
    aio = gpuvisor_async()
    pool = pool_executor()
    pipe = mp_pipe()
    us = 1e6
    rows = [
        Row(
            "no-op round trip p50, Supervisor",
            median(sync) * us,
            "raw pyzmq+msgpack echo p50",
            median(raw) * us,
            "us",
            "<= 2x",
        ),
        Row(
            "no-op round trip p99, Supervisor",
            percentile(sync, 99) * us,
            "raw pyzmq+msgpack echo p99",
            percentile(raw, 99) * us,
            "us",
        ),
        Row(
            "no-op round trip p50, AsyncSupervisor",
            median(aio) * us,
            "raw pyzmq+msgpack echo p50",
            median(raw) * us,
            "us",
            "<= 1.5x",
        ),
        Row(
            "no-op round trip p50, Supervisor",
            median(sync) * us,
            "ProcessPoolExecutor(1) p50",
            median(pool) * us,
            "us",
            "<= 0.33x",
        ),
        Row(
            "no-op round trip p50, Supervisor",
            median(sync) * us,
            "multiprocessing.Pipe echo p50",
            median(pipe) * us,
            "us",
        ),
    ]
    return rows
