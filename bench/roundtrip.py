"""No-op job round trip, one job at a time: gpuvisor against the floor of its
own stack (a raw pyzmq + msgpack echo between two processes) and against the
standard library's ProcessPoolExecutor and multiprocessing.Pipe.

The five ways are measured in ROUNDS interleaved rounds (each round runs all
five, each with a fresh process pair), so a burst of load from the machine's
other tenants hits them alike; the samples of all rounds are pooled."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ProcessPoolExecutor

import msgpack

from bench.common import pipe_child, raw_echo
from bench.report import Row, median, percentile, progress
from supervisor import AsyncSupervisor, Supervisor

ROUNDS = 4
N = 3000  # timed round trips per way and round
WARMUP = 300


def raw_zmq_echo(n: int) -> list[float]:
    samples = []
    with raw_echo("echo.sock") as (router, ident):
        for i in range(n + WARMUP):
            t = time.perf_counter()
            router.send_multipart([ident, msgpack.packb({"k": "job", "job": i, "task": "echo", "payload": None})])
            msgpack.unpackb(router.recv_multipart()[1])
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


def _noop(x):
    return x


def pool_executor(n: int) -> list[float]:
    samples = []
    with ProcessPoolExecutor(1) as pool:
        for _ in range(n + WARMUP):
            t = time.perf_counter()
            pool.submit(_noop, None).result()
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


_PIPE_ECHO = """
import sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
while True:
    try:
        msg = conn.recv()
    except EOFError:
        break
    conn.send(msg)
"""


def mp_pipe(n: int) -> list[float]:
    """A ``multiprocessing.Pipe`` echo: ``send``/``recv`` (pickle) of None."""
    samples = []
    with pipe_child(_PIPE_ECHO) as conn:
        for _ in range(n + WARMUP):
            t = time.perf_counter()
            conn.send(None)
            conn.recv()
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


def gpuvisor_sync(n: int) -> list[float]:
    samples = []
    with Supervisor() as sup:
        sup.switch_mode("diag").result(60)
        for _ in range(n + WARMUP):
            t = time.perf_counter()
            sup.submit("echo").result(60)
            samples.append(time.perf_counter() - t)
    return samples[WARMUP:]


def gpuvisor_async(n: int) -> list[float]:
    async def main():
        samples = []
        async with AsyncSupervisor() as sup:
            await sup.switch_mode("diag")
            for _ in range(n + WARMUP):
                t = time.perf_counter()
                await sup.submit("echo")
                samples.append(time.perf_counter() - t)
        return samples[WARMUP:]

    return asyncio.run(main())


WAYS = {
    "raw": raw_zmq_echo,
    "Supervisor": gpuvisor_sync,
    "AsyncSupervisor": gpuvisor_async,
    "ProcessPoolExecutor": pool_executor,
    "Pipe": mp_pipe,
}


def measure(rounds: int = ROUNDS, n: int = N) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in WAYS}
    for r in range(rounds):
        for name, way in WAYS.items():
            samples[name].extend(way(n))
        progress(
            f"round trip, round {r + 1}/{rounds}: p50 "
            + ", ".join(f"{name} {median(s) * 1e6:.0f}us" for name, s in samples.items())
        )
    return samples


def run() -> list[Row]:
    s = measure()
    us = 1e6
    p50 = {k: median(v) * us for k, v in s.items()}
    p99 = {k: percentile(v, 99) * us for k, v in s.items()}
    n = f"{ROUNDS} x {N} sequential no-op jobs per way, interleaved rounds"
    return [
        Row(
            "round trip p50, Supervisor",
            p50["Supervisor"],
            "raw pyzmq+msgpack echo p50",
            p50["raw"],
            "us",
            limit=2,
            note=n,
        ),
        Row("round trip p99, Supervisor", p99["Supervisor"], "raw pyzmq+msgpack echo p99", p99["raw"], "us"),
        Row(
            "round trip p50, AsyncSupervisor",
            p50["AsyncSupervisor"],
            "raw pyzmq+msgpack echo p50",
            p50["raw"],
            "us",
            limit=1.5,
        ),
        Row("round trip p99, AsyncSupervisor", p99["AsyncSupervisor"], "raw pyzmq+msgpack echo p99", p99["raw"], "us"),
        Row(
            "round trip p50, Supervisor",
            p50["Supervisor"],
            "ProcessPoolExecutor(1) p50",
            p50["ProcessPoolExecutor"],
            "us",
            limit=0.33,
        ),
        Row(
            "round trip p99, Supervisor",
            p99["Supervisor"],
            "ProcessPoolExecutor(1) p99",
            p99["ProcessPoolExecutor"],
            "us",
        ),
        Row("round trip p50, Supervisor", p50["Supervisor"], "multiprocessing.Pipe echo p50", p50["Pipe"], "us"),
    ]
