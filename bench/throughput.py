"""Throughput: N no-op jobs submitted at once, then all awaited, in jobs per
second; against ProcessPoolExecutor(1).map with a chunksize, and against a
raw pyzmq pipelined echo (send all, receive all; unlimited high-water marks
so it cannot deadlock) between two processes.

If ``supervisor.config.Config`` has a ``window`` field (jobs kept in flight
to the worker), the window is swept too, so its default can be chosen by
measurement."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor

import msgpack

from bench.common import config, has_setting, raw_echo
from bench.report import Row, progress
from supervisor import Supervisor

N = 50_000
CHUNKSIZE = 500
WINDOWS = (1, 2, 4, 8, 16, 32)
N_SWEEP = 25_000  # jobs per window and pass in the sweep
SWEEP_PASSES = 2  # windows in order, then in reverse: drift on a shared machine hits them alike


def raw_pipelined(n: int) -> float:
    """jobs/s of a raw ROUTER/DEALER msgpack echo: send all n, then receive all n."""
    with raw_echo("pipe.sock") as (router, ident):
        t = time.perf_counter()
        for i in range(n):
            router.send_multipart([ident, msgpack.packb({"k": "job", "job": i, "task": "echo", "payload": None})])
        for _ in range(n):
            msgpack.unpackb(router.recv_multipart()[1])
        seconds = time.perf_counter() - t
    return n / seconds


def _noop(x):
    return x


def pool_map(n: int) -> float:
    with ProcessPoolExecutor(1) as pool:
        pool.submit(_noop, None).result()  # the worker is up before the clock starts
        t = time.perf_counter()
        out = list(pool.map(_noop, range(n), chunksize=CHUNKSIZE))
        seconds = time.perf_counter() - t
    assert len(out) == n
    return n / seconds


def gpuvisor(n: int, window: int | None = None) -> tuple[float, float]:
    """(jobs/s, seconds spent in the submit() calls alone)."""
    overrides = {"max_queue": n + 1000}
    if window is not None:
        overrides["window"] = window
    with Supervisor(config(**overrides)) as sup:
        sup.switch_mode("diag").result(60)
        for f in [sup.submit("echo") for _ in range(100)]:  # warm both ends
            f.result(60)
        t = time.perf_counter()
        futures = [sup.submit("echo") for _ in range(n)]
        submitted = time.perf_counter() - t
        for f in futures:
            f.result(600)
        seconds = time.perf_counter() - t
    return n / seconds, submitted


def run() -> list[Row]:
    raw1 = raw_pipelined(N)
    pool1 = pool_map(N)
    progress(f"throughput: raw pipelined echo {raw1:,.0f} jobs/s, ProcessPoolExecutor.map {pool1:,.0f} jobs/s")
    sup, submit_s = gpuvisor(N)
    progress(f"throughput: Supervisor {sup:,.0f} jobs/s (the {N:,} submit() calls alone took {submit_s:.2f}s)")
    raw2 = raw_pipelined(N)
    pool2 = pool_map(N)
    progress(f"throughput: raw pipelined echo {raw2:,.0f} jobs/s, ProcessPoolExecutor.map {pool2:,.0f} jobs/s")
    raw, pool = (raw1 + raw2) / 2, (pool1 + pool2) / 2
    default_window = getattr(config(), "window", None)
    rows = [
        Row(
            f"throughput, Supervisor, {N:,} jobs at once",
            sup,
            "raw pyzmq pipelined echo",
            raw,
            "jobs/s",
            limit=20_000,
            on="value",
            higher_is_better=True,
            note=f"window: {default_window if default_window is not None else 'n/a (no window setting)'}; "
            f"the submit() calls alone took {submit_s:.2f}s ({submit_s / N * 1e6:.0f}us each); "
            f"max_queue raised to {N + 1000:,} (the default would refuse); baselines: mean of a run before and after",
        ),
        Row(
            f"throughput, Supervisor, {N:,} jobs at once",
            sup,
            f"ProcessPoolExecutor(1).map chunk {CHUNKSIZE}",
            pool,
            "jobs/s",
            higher_is_better=True,
        ),
    ]
    if not has_setting("window"):
        progress("throughput: Config has no 'window' setting: no window sweep")
        return rows
    runs: dict[int, list[float]] = {w: [] for w in WINDOWS}
    for p in range(SWEEP_PASSES):
        for w in WINDOWS if p % 2 == 0 else reversed(WINDOWS):
            runs[w].append(gpuvisor(N_SWEEP, window=w)[0])
            progress(f"throughput: pass {p + 1}/{SWEEP_PASSES}, window={w}: {runs[w][-1]:,.0f} jobs/s")
    sweep = {w: sum(v) / len(v) for w, v in runs.items()}
    print(
        f"\n  window sweep: {N_SWEEP:,} no-op jobs at once, mean of {SWEEP_PASSES} passes (raw pipelined echo "
        f"{raw:,.0f} jobs/s)"
    )
    print(f"  {'window':>6}  {'jobs/s':>9}  {'vs raw':>6}  each pass")
    for w, v in sweep.items():
        each = ", ".join(f"{x:,.0f}" for x in runs[w])
        print(f"  {w:>6}  {v:>9,.0f}  {v / raw:>6.2f}  {each}{'   <- default' if w == default_window else ''}")
    print(flush=True)
    for w, v in sweep.items():
        rows.append(
            Row(
                f"throughput, window={w}, {N_SWEEP:,} jobs",
                v,
                "raw pyzmq pipelined echo",
                raw,
                "jobs/s",
                higher_is_better=True,
                extra={"passes": runs[w]},
            )
        )
    return rows
