"""One client floods ``gpuvisor serve``; what do the others see?

A real daemon (built-in config, diag loaded) and, in a child process, a
flooder: a raw DEALER that sends ``ping`` requests without pause, and reads
what has come back after every FLOOD_BURST sends (it reads now and then).
A ``Client`` in this process measures ``submit("echo")`` round trips, one at
a time, with the flood and without it, in alternating rounds on the same
daemon; then a streamed job of STREAM_N chunks runs under the flood, and
SIGTERM: the time until the daemon has exited, under the flood. Last, a
flooder that never reads: the daemon's memory while it floods, and whether
it is cut off and told so.

Reported beside the rows: requests the flooder sent and replies it read;
chunks sent by the worker and received.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil

from bench.common import child, reap, scratch_dir, serve_daemon
from bench.report import Row, percentile, progress
from supervisor.client import Client

N = 400  # echo round trips each way, in ROUNDS rounds
ROUNDS = 4
STREAM_N = 100_000
FLOOD_BURST = 1000
SILENT_S = 5.0
START_TIMEOUT = 60.0

FLOODER = """
import json, sys, time, zmq, msgpack
ctx = zmq.Context(); s = ctx.socket(zmq.DEALER); s.setsockopt(zmq.LINGER, 0)
s.connect(sys.argv[1])
burst = int(sys.argv[2])  # pings sent between two reads; 0: it never reads while it floods
sent = read = 0; cut = None
poller = zmq.Poller(); poller.register(sys.stdin, zmq.POLLIN)
def read_all():
    global read, cut
    while True:
        try:
            m = msgpack.unpackb(s.recv(zmq.NOBLOCK), raw=False)
        except zmq.Again:
            return
        read += 1
        if m.get("id") is None and not m.get("ok") and m["error"]["code"] == "client_cut_off":
            cut = cut or m["error"]["message"]
print("flooding", flush=True)
while True:
    if poller.poll(0):  # a line from the bench: "report" (stop, read what is owed, say), or "stop"
        if sys.stdin.readline().strip() == "stop":
            break
        deadline = time.monotonic() + float(sys.argv[3])
        while time.monotonic() < deadline and read < sent and cut is None:
            read_all(); time.sleep(0.01)
        print(json.dumps({"sent": sent, "read": read, "cut_off": cut}), flush=True)
        sys.stdin.readline()  # "stop"
        break
    for _ in range(burst or 1000):
        try:
            s.send(msgpack.packb({"v": 1, "k": "ping", "id": sent}), zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.001)
            break
    if burst:
        read_all()
s.close(); ctx.term()
"""


def _start(tmp: str) -> tuple[subprocess.Popen, str, object]:
    proc, endpoint, log, client = serve_daemon(tmp, START_TIMEOUT)
    client.close()
    return proc, endpoint, log


def _echoes(client: Client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        client.submit("echo").result(60)
        samples.append(time.perf_counter() - t)
    return samples


def _say(flooder: subprocess.Popen, line: str) -> dict | None:
    flooder.stdin.write(line + "\n")
    flooder.stdin.flush()
    return json.loads(flooder.stdout.readline()) if line == "report" else None


def _flood(endpoint: str, burst: int):
    return child(FLOODER, endpoint, str(burst), "10", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def reading_flooder() -> tuple[list[float], list[float], dict, int, bool, float, dict]:
    """(quiet echoes, flooded echoes, the flooder's counts, chunks received,
    stream ok, SIGTERM to exit, the daemon's clients figures). Quiet and
    flooded echoes alternate in ROUNDS rounds, so that the machine's own
    noise falls on both alike."""
    proc, endpoint, log = _start(scratch_dir())
    quiet: list[float] = []
    flooded: list[float] = []
    counts = {"sent": 0, "read": 0, "cut_off": None}
    try:
        with Client(endpoint, timeout=30.0) as client:
            client.switch_mode("diag").result(60)
            _echoes(client, 100)  # warm-up
            for _ in range(ROUNDS):
                quiet += _echoes(client, N // ROUNDS)
                with _flood(endpoint, FLOOD_BURST) as flooder:
                    assert flooder.stdout.readline().strip() == "flooding"
                    time.sleep(0.3)
                    flooded += _echoes(client, N // ROUNDS)
                    said = _say(flooder, "report")  # it stops, and reads what it is owed
                    _say(flooder, "stop")
                    flooder.wait(30)
                counts = {
                    "sent": counts["sent"] + said["sent"],
                    "read": counts["read"] + said["read"],
                    "cut_off": counts["cut_off"] or said["cut_off"],
                }
            with _flood(endpoint, FLOOD_BURST) as flooder:
                assert flooder.stdout.readline().strip() == "flooding"
                time.sleep(0.3)
                stream = client.submit("count", {"n": STREAM_N}, stream=True)
                chunks = sum(1 for _ in stream)
                stream_ok = stream.result(60) == {"count": STREAM_N}
                clients = client.status()["clients"]
                t = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
                stop_s = time.perf_counter() - t
                _say(flooder, "stop")
                flooder.wait(30)
    except BaseException:
        log.seek(0)
        print("".join(log.readlines()[-20:]), file=sys.stderr)
        raise
    finally:
        reap(proc, grace=10)
        log.close()
    return quiet, flooded, counts, chunks, stream_ok, stop_s, clients


def silent_flooder() -> tuple[float, float, dict, dict]:
    """A flooder that never reads, for SILENT_S: (the daemon's RSS before,
    its largest RSS during, the flooder's counts, the daemon's clients figures)."""
    proc, endpoint, log = _start(scratch_dir())
    try:
        daemon = psutil.Process(proc.pid)
        before = daemon.memory_info().rss
        peak = before
        with _flood(endpoint, 0) as flooder:
            assert flooder.stdout.readline().strip() == "flooding"
            deadline = time.monotonic() + SILENT_S
            while time.monotonic() < deadline:
                time.sleep(0.1)
                peak = max(peak, daemon.memory_info().rss)
            with Client(endpoint, timeout=30.0) as client:
                clients = client.status()["clients"]
            counts = _say(flooder, "report")  # it reads now: what was in its pipe, then the notice
            _say(flooder, "stop")
            flooder.wait(30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        reap(proc, grace=10)
        log.close()
    return before, peak, counts, clients


def run() -> list[Row]:
    quiet, flooded, counts, chunks, stream_ok, stop_s, clients = reading_flooder()
    progress(
        f"flood: echo p99 {percentile(quiet, 99) * 1e3:.2f} ms quiet, {percentile(flooded, 99) * 1e3:.2f} ms flooded; "
        f"flooder sent {counts['sent']:,}, read {counts['read']:,}, cut off: {bool(counts['cut_off'])}; "
        f"chunks {chunks:,} of {STREAM_N:,}; SIGTERM to exit {stop_s:.3f}s; daemon's clients: {clients}"
    )
    before, peak, silent, silent_clients = silent_flooder()
    progress(
        f"flood: a flooder that never reads: daemon RSS {before / 2**20:.1f} MiB before, at most {peak / 2**20:.1f} "
        f"MiB in {SILENT_S:g}s; it sent {silent['sent']:,}, read {silent['read']:,}, told it was cut off: "
        f"{bool(silent['cut_off'])}; daemon's clients: {silent_clients}"
    )
    us = 1e6
    return [
        Row(
            "echo p99 while another client floods",
            percentile(flooded, 99) * us,
            "the same echo, no flood",
            percentile(quiet, 99) * us,
            "us",
            limit=3,
            note=f"p50 {percentile(flooded, 50) * us:.0f} us flooded, {percentile(quiet, 50) * us:.0f} us quiet; "
            f"{N} sequential echo jobs each way, in {ROUNDS} alternating rounds; the flooder (reads after every {FLOOD_BURST:,} pings) sent "
            f"{counts['sent']:,} pings, {counts['read']:,} answered ({'cut off' if counts['cut_off'] else 'not cut off'})"
            f"; a {STREAM_N:,}-chunk stream under the flood: {chunks:,} chunks received, "
            f"{'then its result' if stream_ok else 'then a FAILURE'}",
            extra={
                "flooder": counts,
                "chunks": chunks,
                "stream_n": STREAM_N,
                "clients": clients,
                "p50_quiet_us": percentile(quiet, 50) * us,
                "p50_flooded_us": percentile(flooded, 50) * us,
            },
        ),
        Row(
            "SIGTERM to exit, under the flood",
            stop_s,
            "(goal 1 s)",
            1.0,
            "s",
            limit=1.0,
            on="value",
            note="nothing queued, so nothing to drain: the daemon stops its worker and exits",
        ),
        Row(
            f"daemon RSS, {SILENT_S:g}s of a flooder that never reads",
            peak / 2**20,
            "daemon RSS before",
            before / 2**20,
            "MiB",
            limit=1.5,
            note=f"it sent {silent['sent']:,} pings and was cut off ({silent_clients['cut_off']} cut off, "
            f"{silent_clients['refused']:,} requests not run); it then read {silent['read']:,} messages, "
            f"{'the cut-off notice among them' if silent['cut_off'] else 'but NO cut-off notice'}",
            extra={"flooder": silent, "clients": silent_clients},
        ),
    ]
