"""Shutdown time: ``shutdown()`` (drain=True) from the call to its return,
with the worker reaped. With an idle worker (goal <= 0.3 s; the median of
REPS supervisors), and with N short jobs still queued (``sleep`` JOB_S
seconds each), against N x the job time, the least a drain can take."""

from __future__ import annotations

import time

from bench.report import Row, median, progress
from supervisor import Supervisor

REPS = 5
N = 50
JOB_S = 0.02


def idle_shutdown() -> float:
    sup = Supervisor().start()
    try:
        sup.switch_mode("diag").result(60)
        sup.submit("echo").result(60)
        t = time.perf_counter()
        sup.shutdown()
        return time.perf_counter() - t
    finally:
        sup.shutdown(drain=False)  # a no-op after a shutdown; stops it if the bench failed first


def queued_shutdown() -> tuple[float, int]:
    """(seconds, jobs that ran)."""
    sup = Supervisor().start()
    try:
        sup.switch_mode("diag").result(60)
        futures = [sup.submit("sleep", {"seconds": JOB_S}) for _ in range(N)]
        t = time.perf_counter()
        sup.shutdown()
        seconds = time.perf_counter() - t
    finally:
        sup.shutdown(drain=False)
    return seconds, sum(1 for f in futures if f.done() and not f.cancelled() and f.exception() is None)


def run() -> list[Row]:
    idle = [idle_shutdown() for _ in range(REPS)]
    progress(f"drain: idle shutdowns {', '.join(f'{x * 1e3:.0f}ms' for x in idle)}")
    queued = [queued_shutdown() for _ in range(3)]
    progress(
        f"drain: shutdowns with {N} x {JOB_S * 1e3:.0f} ms jobs queued: "
        f"{', '.join(f'{s:.3f}s ({ran} ran)' for s, ran in queued)}"
    )
    ideal = N * JOB_S
    seconds = median([s for s, _ in queued])
    return [
        Row(
            f"shutdown, idle worker (median of {REPS})",
            median(idle),
            "(goal 0.3 s)",
            0.3,
            "s",
            limit=0.3,
            on="value",
            note=f"each: {', '.join(f'{x:.3f}' for x in idle)} s",
        ),
        Row(
            f"shutdown, {N} x {JOB_S * 1e3:.0f} ms jobs queued (median of 3)",
            seconds,
            f"{N} x job time",
            ideal,
            "s",
            note=f"jobs that ran to a result: {', '.join(str(r) for _, r in queued)} of {N}; the clock starts "
            "after the submits, so a job or two may already be done",
        ),
    ]
