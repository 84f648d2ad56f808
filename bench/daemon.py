"""Client -> daemon -> worker: a no-op round trip through ``gpuvisor serve``
(``python -m supervisor.service.cli --endpoint ipc://... serve``, built-in config, in a
subprocess), one job at a time, ``client.submit("echo").result()``, against
the in-process ``Supervisor`` round trip measured in the same run (the two
interleaved in ROUNDS rounds). The daemon is stopped with
``client.shutdown()`` and waited for; killed if it does not go."""

from __future__ import annotations

import sys
import time

from bench.common import reap, scratch_dir, serve_daemon
from bench.report import Row, median, percentile, progress
from bench.roundtrip import gpuvisor_sync

ROUNDS = 3
N = 2000
WARMUP = 200
START_TIMEOUT = 60.0


def through_daemon(n: int) -> tuple[list[float], float]:
    """(round trip samples, seconds from Popen to the first ping answered)."""
    t0 = time.perf_counter()
    proc, _, log, client = serve_daemon(scratch_dir(), START_TIMEOUT)
    try:
        started = time.perf_counter() - t0
        client.switch_mode("diag").result(60)
        samples = []
        for _ in range(n + WARMUP):
            t = time.perf_counter()
            client.submit("echo").result(60)
            samples.append(time.perf_counter() - t)
        client.shutdown()
        proc.wait(30)
        if proc.returncode != 0:
            raise RuntimeError(f"the daemon exited with {proc.returncode}")
    except BaseException:
        log.seek(0)
        print("".join(log.readlines()[-20:]), file=sys.stderr)
        raise
    finally:
        client.close()
        reap(proc, grace=10)  # SIGTERM (the daemon drains and stops its worker), then SIGKILL
        log.close()
    return samples[WARMUP:], started


def run() -> list[Row]:
    daemon: list[float] = []
    inproc: list[float] = []
    starts = []
    for r in range(ROUNDS):
        samples, started = through_daemon(N)
        daemon.extend(samples)
        starts.append(started)
        inproc.extend(gpuvisor_sync(N))
        progress(
            f"daemon, round {r + 1}/{ROUNDS}: p50 through the daemon {median(daemon) * 1e6:.0f}us, "
            f"in-process Supervisor {median(inproc) * 1e6:.0f}us (daemon answered a ping {started:.2f}s "
            "after Popen)"
        )
    us = 1e6
    return [
        Row(
            "round trip p50, client -> daemon -> worker",
            median(daemon) * us,
            "in-process Supervisor p50",
            median(inproc) * us,
            "us",
            note=f"{ROUNDS} x {N} sequential no-op jobs each, interleaved rounds; the "
            f"daemon answered its first ping {median(starts):.2f}s after Popen (median)",
        ),
        Row(
            "round trip p99, client -> daemon -> worker",
            percentile(daemon, 99) * us,
            "in-process Supervisor p99",
            percentile(inproc, 99) * us,
            "us",
        ),
    ]
