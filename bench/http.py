"""The HTTP door against the ZeroMQ one: 50 clients at once, each sending
40 embedding requests of one short text, one after the other, through
``POST /v1/embeddings`` on the daemon's unix socket, against the same 50 x
40 jobs through the ZeroMQ ``Client`` (50 threads, a client each), on the
same ``gpuvisor serve`` (built-in configuration, the real embedding model),
the two interleaved in ROUNDS rounds. Every request must be answered with
one 384-value vector, or the run fails.

What is measured is the wall time of the whole burst: the HTTP figure pays
for JSON, HTTP parsing and the event loop on top of the same queue and
worker (whose batching serves both the same way).

Then ``/health``'s latency (p50, p99; one probe after the other on one
keep-alive connection) while the largest embeddings request the door allows
(``max_inputs`` = 2048 inputs) is served, BIG_ROUNDS times in a row, against
the same probes on the idle daemon: the door reads that request's body,
waits for the worker and writes a 2048 x 384 answer (about 9 MB of JSON)
meanwhile, and a probe must not wait behind any of it. ``python -m
bench.http`` runs it alone."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import httpx2

from bench.common import reap, scratch_dir, serve_daemon
from bench.report import Row, median, percentile, print_table, progress
from supervisor.client import Client
from supervisor.config_http import HttpSettings

CLIENTS = 50
REQUESTS = 40
ROUNDS = 3
MODEL = "all-minilm-l6-v2"  # the built-in configuration's name for the embed mode
START_TIMEOUT = 120.0
BIG = HttpSettings.max_inputs  # the largest embeddings request the door allows
BIG_ROUNDS = 3
IDLE_PROBES = 500


def _burst(one_client: Callable[[int], int]) -> tuple[float, int]:
    """(wall seconds, answers) for CLIENTS threads running ``one_client(n)`` at once."""
    answered = [0] * CLIENTS
    errors: list[BaseException] = []
    start = threading.Barrier(CLIENTS + 1)

    def run(n: int) -> None:
        start.wait()
        try:
            answered[n] = one_client(n)
        except BaseException as exc:  # noqa: BLE001 - reported below: every request must be answered
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, the first with {errors[0]!r}") from errors[0]
    return seconds, sum(answered)


def _zmq(endpoint: str) -> Callable[[int], int]:
    def one_client(n: int) -> int:
        with Client(endpoint, timeout=60) as client:
            for i in range(REQUESTS):
                vectors = client.submit("embed", {"texts": [f"client {n} asks {i}"]}, mode="embed").result(120)
                assert vectors.shape == (1, 384), vectors.shape
        return REQUESTS

    return one_client


def _http(socket_path: str) -> Callable[[int], int]:
    def one_client(n: int) -> int:
        transport = httpx2.HTTPTransport(uds=socket_path)
        with httpx2.Client(transport=transport, base_url="http://gpuvisor", timeout=120) as http:
            for i in range(REQUESTS):
                answer = http.post("/v1/embeddings", json={"model": MODEL, "input": f"client {n} asks {i}"})
                assert answer.status_code == 200, answer.text
                data = answer.json()["data"]
                assert len(data) == 1 and len(data[0]["embedding"]) == 384
        return REQUESTS

    return one_client


def _health_probes(http: httpx2.Client, until: Callable[[], bool]) -> list[float]:
    """Milliseconds of each ``GET /health``, one after the other, until ``until()``."""
    seconds = []
    while not until():
        t0 = time.perf_counter()
        answer = http.get("/health")
        seconds.append(time.perf_counter() - t0)
        assert answer.status_code == 200, answer.text
    return [s * 1000 for s in seconds]


def _health_while_big(socket_path: str) -> tuple[list[float], list[float], float]:
    """(/health ms idle, /health ms while BIG-input requests are served, seconds per BIG request)."""
    texts = [f"input {i}: the quick brown fox jumps over the lazy dog" for i in range(BIG)]
    transport = httpx2.HTTPTransport(uds=socket_path)
    with httpx2.Client(transport=transport, base_url="http://gpuvisor", timeout=120) as http:
        count = iter(range(IDLE_PROBES + 1))
        idle = _health_probes(http, lambda: next(count) == IDLE_PROBES)
        done = threading.Event()
        took: list[float] = []
        errors: list[BaseException] = []

        def big() -> None:
            try:
                transport = httpx2.HTTPTransport(uds=socket_path)
                with httpx2.Client(transport=transport, base_url="http://gpuvisor", timeout=600) as client:
                    for _ in range(BIG_ROUNDS):
                        t0 = time.perf_counter()
                        answer = client.post("/v1/embeddings", json={"model": MODEL, "input": texts})
                        took.append(time.perf_counter() - t0)
                        assert answer.status_code == 200, answer.text[:500]
                        # Counted, not parsed: parsing 9 MB of JSON would hold this process's GIL, and the probes'.
                        assert answer.content.count(b'"object":"embedding"') == BIG
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)
            finally:
                done.set()

        thread = threading.Thread(target=big)
        thread.start()
        busy = _health_probes(http, done.is_set)
        thread.join()
    if errors:
        raise RuntimeError(f"the {BIG}-input request failed: {errors[0]!r}") from errors[0]
    return idle, busy, median(took)


def run() -> list[Row]:
    tmp = scratch_dir()
    socket_path = os.path.join(tmp, "run", "http.sock")  # the built-in [http]: unix:http.sock, beside the daemon's
    proc, endpoint, log, client = serve_daemon(tmp, START_TIMEOUT)
    http_s: list[float] = []
    zmq_s: list[float] = []
    idle_ms: list[float] = []
    busy_ms: list[float] = []
    big_s = 0.0
    try:
        with client:
            client.switch_mode("embed").result(START_TIMEOUT)
        if not os.path.exists(socket_path):
            raise RuntimeError(f"the daemon serves no HTTP at {socket_path}: is the http extra installed?")
        _http(socket_path)(0), _zmq(endpoint)(0)  # warm both paths (imports, first connections)
        for r in range(ROUNDS):
            for name, phase, out in (("ZeroMQ", _zmq(endpoint), zmq_s), ("HTTP", _http(socket_path), http_s)):
                seconds, answered = _burst(phase)
                if answered != CLIENTS * REQUESTS:
                    raise RuntimeError(f"{name}: {answered} of {CLIENTS * REQUESTS} requests answered")
                out.append(seconds)
            progress(
                f"http, round {r + 1}/{ROUNDS}: {CLIENTS} x {REQUESTS} embeddings in {http_s[-1]:.2f}s over "
                f"HTTP, {zmq_s[-1]:.2f}s over ZeroMQ"
            )
        idle_ms, busy_ms, big_s = _health_while_big(socket_path)
        progress(
            f"http: /health p99 {percentile(busy_ms, 99):.2f} ms while {BIG}-input embeddings are served "
            f"({big_s:.1f}s each), {percentile(idle_ms, 99):.2f} ms idle"
        )
        with Client(endpoint, timeout=10) as client:
            client.shutdown()
        proc.wait(60)
    except BaseException:
        log.seek(0)
        print("".join(log.readlines()[-20:]), file=sys.stderr)
        raise
    finally:
        reap(proc, grace=10)
        log.close()
    total = CLIENTS * REQUESTS
    return [
        Row(
            f"{CLIENTS} HTTP clients x {REQUESTS} embeddings, wall time",
            median(http_s),
            f"the same through {CLIENTS} ZeroMQ Clients",
            median(zmq_s),
            "s",
            note=f"median of {ROUNDS} interleaved rounds; every one of the {total} requests answered each time "
            f"({total / median(http_s):.0f} vs {total / median(zmq_s):.0f} requests/s); one short text each, "
            "the built-in embed model, the daemon's unix sockets",
            extra={"http_s": http_s, "zmq_s": zmq_s},
        ),
        *[
            Row(
                f"/health p{p} while {BIG}-input embeddings are served",
                percentile(busy_ms, p),
                f"/health p{p} idle",
                percentile(idle_ms, p),
                "ms",
                note=f"{len(busy_ms)} probes during {BIG_ROUNDS} requests of {BIG} inputs (the door's max_inputs; "
                f"{big_s:.1f}s each, a 2048 x 384 answer), {len(idle_ms)} idle; one keep-alive connection; the "
                f"slowest {max(busy_ms):.1f} ms busy, {max(idle_ms):.1f} ms idle"
                if p == 99
                else "",
                extra={"busy_probes": len(busy_ms), "idle_probes": len(idle_ms), "big_s": big_s},
            )
            for p in (50, 99)
        ],
    ]


if __name__ == "__main__":
    print_table(run())
