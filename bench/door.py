"""The HTTP door as users meet it: loopback TCP, one sentence a request.

The bench starts a real ``gpuvisor serve`` whose HTTP door listens on a
free loopback port (its own config: the embed mode on CPU, no warm standby,
whose imports would only add noise at the start), and the server a user
would write by hand (``bench.naive_server``: FastAPI and uvicorn with their
defaults, the same model in-process, one encode per request) on another.
Then, in ``ROUNDS`` interleaved rounds (every other round in reverse order,
so a neighbour's load falls on each alike):

* **Sequential.** One client, one keep-alive connection, SEQUENTIAL
  requests one after the other, against each server: p50 and p99 in ms.
  Goal: gpuvisor's p50 <= 1.3 x the naive server's.
* **32 clients.** CLIENTS connections, each sending REQUESTS requests in a
  closed loop (the next when the last is answered), against each server,
  and the same jobs through CLIENTS ZeroMQ ``AsyncClient``s on the daemon;
  and the same sentences through the model called directly in batches of
  64 (in a child that loads it once: this process never imports torch). Goals: gpuvisor's HTTP req/s >= 0.85 x the model directly and
  >= 0.9 x ZeroMQ on the same load.

Latency is the median over rounds of each round's percentile; throughput is
the best round (the least disturbed: the machine is shared, and torch's
threads spin while they wait for each other, so a neighbour that takes a
core can cost the model several times its CPU: read the ratios, and the
rounds in the notes). Every answer is
checked (status 200 and one vector of WIDTH floats), or the run fails. The
HTTP clients are a few lines of asyncio over raw sockets, so the load costs
little CPU beside the servers on a small machine. ``python -m bench door``
runs it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson

from bench.common import free_port, pipe_child, reap, scratch_dir, serve_daemon
from bench.report import Row, median, percentile, print_table, progress
from bench.traffic import SENTENCE
from supervisor.client import AsyncClient, Client

CLIENTS = 32
REQUESTS = 15  # per client per round
SEQUENTIAL = 100  # one client's requests per round, against each server
ROUNDS = 3
DIRECT_BATCH = 64
WIDTH = 384  # the built-in model's vector
MODEL = "all-minilm-l6-v2"
START_TIMEOUT = 120.0
TIMEOUT = 120.0  # any one answer
T = TypeVar("T")

_CONFIG = """
[supervisor]
default_mode = "embed"
warm_standby = false

[modes.embed]
loader = "worker.modes.embed:load"
args = {{ device = "cpu" }}

[http]
listen = ["127.0.0.1:{port}"]
allow_unauthenticated_tcp = true

[http.models."{model}"]
mode = "embed"
embeddings = "embed"
"""


def _text(client: int, n: int) -> str:
    return f"{SENTENCE} ({client}, {n})"


# The model called directly: sentences/s for each (texts, batch size) it is sent.
_DIRECT = """
import sys, time
from multiprocessing.connection import Connection
from worker.modes.embed import load
conn = Connection(int(sys.argv[1]))
embed = load(device="cpu")["embed"]  # @batched: a list of payloads in, a list of results out
while True:
    try:
        texts, size = conn.recv()
    except EOFError:
        break
    t = time.perf_counter()
    for i in range(0, len(texts), size):
        embed([{"texts": texts[i:i + size]}])
    conn.send(len(texts) / (time.perf_counter() - t))
"""


@dataclass
class Load:
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, one per request

    @property
    def per_s(self) -> float:
        return len(self.latencies) / self.seconds

    def ms(self, p: float) -> float:
        return percentile(self.latencies, p) * 1000


# ------------------------------------------------------------ HTTP clients


def _post(port: int, text: str) -> bytes:
    body = orjson.dumps({"model": MODEL, "input": text})
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """Send one request on a keep-alive connection; (status, body) of its answer."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, await reader.readexactly(int(value))
    raise RuntimeError(f"an answer without Content-Length: {head[:300]!r}")


def _check_http(answer: tuple[int, bytes], where: str) -> None:
    status, body = answer
    if status != 200:
        raise RuntimeError(f"{where}: status {status}: {body[:300]!r}")
    data = orjson.loads(body)["data"]
    vector = data[0]["embedding"] if len(data) == 1 else None
    if not isinstance(vector, list) or len(vector) != WIDTH or not all(isinstance(v, float) for v in vector):
        raise RuntimeError(f"{where}: not one vector of {WIDTH} floats: {body[:300]!r}")


async def _closed_loop(senders: list[Callable[[int], Awaitable[T]]], requests: int, check: Callable[[T], None]) -> Load:
    """All clients at once, each sending ``requests`` one after the other:
    ``send(n)`` is a client's n-th request and its answer, which ``check``
    refuses unless right (outside the time taken)."""
    load = Load(0.0)

    async def one(send: Callable[[int], Awaitable[T]]) -> None:
        for n in range(requests):
            t0 = time.perf_counter()
            answer = await asyncio.wait_for(send(n), TIMEOUT)
            load.latencies.append(time.perf_counter() - t0)
            check(answer)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(send) for send in senders))
    load.seconds = time.perf_counter() - t0
    return load


def http_load(port: int, clients: int, requests: int, where: str) -> Load:
    """``clients`` keep-alive connections to ``port``."""

    async def main() -> Load:
        def sender(c: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Callable[[int], Awaitable]:
            return lambda n: _exchange(reader, writer, _post(port, _text(c, n)))

        connections = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(clients)))
        try:
            senders = [sender(c, *connection) for c, connection in enumerate(connections)]
            return await _closed_loop(senders, requests, lambda answer: _check_http(answer, where))
        finally:
            for _, writer in connections:
                writer.close()

    return asyncio.run(main())


def zmq_load(endpoint: str, clients: int, requests: int) -> Load:
    """The same jobs through ``clients`` ZeroMQ clients of the daemon."""

    def check(vectors: Any) -> None:
        if getattr(vectors, "shape", None) != (1, WIDTH):
            raise RuntimeError(f"ZeroMQ: not one vector of {WIDTH} floats: {vectors!r:.300}")

    async def main() -> Load:
        def sender(c: int, client: AsyncClient) -> Callable[[int], Awaitable]:
            return lambda n: client.submit("embed", {"texts": [_text(c, n)]}, mode="embed")

        connected = [AsyncClient(endpoint, timeout=TIMEOUT) for _ in range(clients)]
        try:
            return await _closed_loop([sender(c, client) for c, client in enumerate(connected)], requests, check)
        finally:
            for client in connected:
                await client.close()

    return asyncio.run(main())


# ------------------------------------------------------------ the servers


@contextlib.contextmanager
def _servers(folder: str) -> Iterator[tuple[int, int, str]]:
    """(gpuvisor's HTTP port, the naive server's port, the daemon's ZeroMQ
    endpoint), both serving the embed model; both reaped on the way out."""
    naive_port, door_port = free_port(), free_port()
    config_file = os.path.join(folder, "door.toml")
    with open(config_file, "w") as f:
        f.write(_CONFIG.format(port=door_port, model=MODEL))
    with contextlib.ExitStack() as stack:
        naive_log = stack.enter_context(open(os.path.join(folder, "naive.log"), "w+"))
        naive = subprocess.Popen(
            [sys.executable, "-m", "bench.naive_server", str(naive_port)], stdout=naive_log, stderr=subprocess.STDOUT
        )
        stack.callback(reap, naive)
        proc, endpoint, log, client = serve_daemon(folder, START_TIMEOUT, config_file)
        stack.callback(log.close)
        stack.callback(reap, proc, 10)
        try:
            with client:
                client.switch_mode("embed").result(START_TIMEOUT)
            _wait_answering(naive_port, naive, "the naive server")
            yield door_port, naive_port, endpoint
            with Client(endpoint, timeout=10) as client:
                client.shutdown()
            proc.wait(60)
        except BaseException:
            for name, file in (("daemon", log), ("naive server", naive_log)):
                file.seek(0)
                print(f"--- the {name}'s last lines:\n" + "".join(file.readlines()[-20:]), file=sys.stderr)
            raise


def _wait_answering(port: int, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before answering")
        try:
            http_load(port, 1, 1, name)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer within {START_TIMEOUT:g}s") from None
            time.sleep(0.2)


def _batches(endpoint: str) -> dict[str, int]:
    """The daemon's count of batches of more than one job, and the jobs in them."""
    with Client(endpoint, timeout=10) as client:
        return dict(client.status()["batches"])


# ------------------------------------------------------------ the run


def run() -> list[Row]:
    seq: dict[str, list[Load]] = {"gpuvisor": [], "naive": []}
    many: dict[str, list[Load]] = {"gpuvisor": [], "naive": [], "zmq": []}
    by_hand: list[float] = []
    batched: list[tuple[int, int]] = []  # (batches, jobs in them) during each gpuvisor HTTP load
    texts = [_text(c, n) for c in range(CLIENTS) for n in range(REQUESTS)]  # what the clients send
    with pipe_child(_DIRECT) as model, _servers(scratch_dir()) as (door, naive, endpoint):
        for port in (door, naive):  # warm all: imports, first connections, the model's first shapes
            http_load(port, 4, 5, "warm-up")
        zmq_load(endpoint, 4, 5)
        model.send((texts[:DIRECT_BATCH], DIRECT_BATCH))
        model.recv()

        def directly() -> None:
            model.send((texts, DIRECT_BATCH))
            by_hand.append(model.recv())

        def gpuvisor_http() -> None:
            before = _batches(endpoint)
            many["gpuvisor"].append(http_load(door, CLIENTS, REQUESTS, "gpuvisor"))
            after = _batches(endpoint)
            batched.append((after["count"] - before["count"], after["jobs"] - before["jobs"]))

        phases: list[Callable[[], object]] = [
            lambda: seq["gpuvisor"].append(http_load(door, 1, SEQUENTIAL, "gpuvisor")),
            lambda: seq["naive"].append(http_load(naive, 1, SEQUENTIAL, "the naive server")),
            gpuvisor_http,
            lambda: many["zmq"].append(zmq_load(endpoint, CLIENTS, REQUESTS)),
            lambda: many["naive"].append(http_load(naive, CLIENTS, REQUESTS, "the naive server")),
            directly,
        ]
        for r in range(ROUNDS):
            for phase in phases if r % 2 == 0 else phases[::-1]:
                phase()
            progress(
                f"door, round {r + 1}/{ROUNDS}: sequential p50 {seq['gpuvisor'][-1].ms(50):.1f} ms vs "
                f"{seq['naive'][-1].ms(50):.1f} naive; {CLIENTS} clients {many['gpuvisor'][-1].per_s:.0f} req/s "
                f"HTTP, {many['zmq'][-1].per_s:.0f} ZeroMQ, {many['naive'][-1].per_s:.0f} naive, "
                f"{by_hand[-1]:.0f}/s the model directly"
            )
    if "torch" in sys.modules:
        raise RuntimeError("the bench process imported torch: the model directly must run in a child")
    return _rows(seq, many, by_hand, batched)


def _rows(
    seq: dict[str, list[Load]], many: dict[str, list[Load]], by_hand: list[float], batched: list[tuple[int, int]]
) -> list[Row]:
    def p(name: str, q: float) -> float:
        return median([load.ms(q) for load in seq[name]])

    best = {name: max(load.per_s for load in loads) for name, loads in many.items()}
    each = "; ".join(f"{name} {', '.join(f'{load.per_s:.0f}' for load in loads)}" for name, loads in many.items())
    count, jobs = map(sum, zip(*batched, strict=True))
    total = ROUNDS * CLIENTS * REQUESTS
    mean_batch = total / (count + total - jobs)  # a job sent alone is a batch of one
    latency_note = (
        f"{SEQUENTIAL} requests a round, one keep-alive connection; median of {ROUNDS} interleaved "
        f"rounds; p50 each round (ms): gpuvisor {', '.join(f'{x.ms(50):.1f}' for x in seq['gpuvisor'])}, "
        f"naive {', '.join(f'{x.ms(50):.1f}' for x in seq['naive'])}"
    )
    load = f"{CLIENTS} HTTP clients x {REQUESTS} embeddings, TCP (req/s)"
    load_note = (
        f"closed loop, one sentence a request; best of {ROUNDS} interleaved rounds, each (req/s): {each}; "
        f"direct {', '.join(f'{x:.0f}' for x in by_hand)}; gpuvisor HTTP p50 "
        f"{median([x.ms(50) for x in many['gpuvisor']]):.1f} ms; the worker's mean batch {mean_batch:.1f} "
        "jobs"
    )
    return [
        Row(
            "HTTP over TCP, 1 client sequential: p50 (ms)",
            p("gpuvisor", 50),
            "the naive FastAPI server, p50",
            p("naive", 50),
            "ms",
            limit=1.3,
            note=latency_note,
        ),
        Row(
            "HTTP over TCP, 1 client sequential: p99 (ms)",
            p("gpuvisor", 99),
            "the naive FastAPI server, p99",
            p("naive", 99),
            "ms",
        ),
        Row(
            load,
            best["gpuvisor"],
            f"the model directly, batches of {DIRECT_BATCH}",
            max(by_hand),
            "req/s",
            limit=0.85,
            higher_is_better=True,
            note=load_note,
            extra={
                "each": {n: [x.per_s for x in loads] for n, loads in many.items()},
                "direct": by_hand,
                "mean_batch": mean_batch,
            },
        ),
        Row(
            load,
            best["gpuvisor"],
            f"the same through {CLIENTS} ZeroMQ Clients",
            best["zmq"],
            "req/s",
            limit=0.9,
            higher_is_better=True,
        ),
        Row(load, best["gpuvisor"], "the naive FastAPI server, same load", best["naive"], "req/s"),
    ]


if __name__ == "__main__":
    print_table(run())
