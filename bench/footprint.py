"""The supervisor process's own footprint: RSS and CPU seconds (user +
system, psutil), idle (started, diag loaded, IDLE_S seconds idle) and under
load (N no-op jobs submitted at once, then awaited).

Measured in a fresh subprocess that imports only ``supervisor`` (and psutil,
which it imports anyway), so the bench process's numpy, torch and test
harness do not count; it prints its figures as JSON. The baseline is a bare
``python -c "import time; time.sleep(5)"`` under psutil, started alongside."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil

from bench.common import child, reap
from bench.report import Row, progress

IDLE_S = 5.0
N = 20_000
MB = 1e6

_PROBE = """
import json, sys, time
import psutil
from supervisor import Supervisor, config
import dataclasses

idle_s, n = float(sys.argv[1]), int(sys.argv[2])
me = psutil.Process()


def peak_rss():
    # VmHWM: this process's peak RSS. Not ru_maxrss, which Linux carries over
    # an exec from the forking parent (the bench process, arrays and all).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


cpu = lambda: sum(me.cpu_times()[:2])
out = {"rss_imported": me.memory_info().rss}
sup = Supervisor(dataclasses.replace(config.load(None), max_queue=n + 1000)).start()
try:
    sup.switch_mode("diag").result(60)
    out["rss_started"] = me.memory_info().rss
    c, t = cpu(), time.monotonic()
    time.sleep(idle_s)
    out["idle_cpu"], out["idle_wall"] = cpu() - c, time.monotonic() - t
    out["rss_idle"] = me.memory_info().rss
    out["peak_idle"] = peak_rss()
    c, t = cpu(), time.monotonic()
    futures = [sup.submit("echo") for _ in range(n)]
    out["rss_queued"] = me.memory_info().rss  # every job accepted, most still queued
    for f in futures:
        f.result(600)
    out["load_cpu"], out["load_wall"] = cpu() - c, time.monotonic() - t
    out["peak_load"] = peak_rss()  # the peak so far: during the jobs
    del futures
    out["rss_after"] = me.memory_info().rss
    out["threads"] = me.num_threads()
finally:
    sup.shutdown()
out["heavy_modules"] = sorted(m for m in ("numpy", "torch", "transformers") if m in sys.modules)
print(json.dumps(out))
"""


def bare_python_rss() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])


def run() -> list[Row]:
    bare_proc = bare_python_rss()
    try:
        time.sleep(1.0)  # well past its start-up
        bare_rss = psutil.Process(bare_proc.pid).memory_info().rss
        bare_proc.wait(10)
    finally:
        reap(bare_proc)
    progress(
        f"footprint: bare python RSS {bare_rss / MB:.1f} MB; probing the supervisor ({IDLE_S:g}s idle, {N:,} jobs)"
    )
    with child(_PROBE, str(IDLE_S), str(N), stdout=subprocess.PIPE, text=True) as proc:
        stdout, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the footprint probe exited with {proc.returncode}")
    f = json.loads(stdout.strip().splitlines()[-1])
    progress("footprint: " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in f.items() if k.startswith(("rss", "peak"))))
    heavy = f"heavy modules in the probe: {', '.join(f['heavy_modules']) or 'none'}"
    bare = "bare python -c sleep RSS"
    return [
        Row(
            "supervisor RSS, idle (diag loaded, 5 s)",
            f["rss_idle"] / MB,
            bare,
            bare_rss / MB,
            "MB",
            limit=60,
            on="value",
            note=f"MB = 1e6 bytes; fresh process importing only supervisor; {heavy}; "
            f"after import {f['rss_imported'] / MB:.1f} MB, after start {f['rss_started'] / MB:.1f} MB",
            extra=f,
        ),
        Row(
            f"supervisor RSS peak, {N:,} jobs at once",
            f["peak_load"] / MB,
            bare,
            bare_rss / MB,
            "MB",
            note=f"VmHWM; with all {N:,} accepted: {f['rss_queued'] / MB:.1f} MB, after they ended and were "
            f"dropped: {f['rss_after'] / MB:.1f} MB",
        ),
        Row(
            "supervisor CPU, 5 s idle",
            f["idle_cpu"],
            "wall time idle",
            f["idle_wall"],
            "s",
            note="ratio: the share of one core the idle supervisor uses",
        ),
        Row(
            f"supervisor CPU, {N:,} jobs at once",
            f["load_cpu"],
            "wall time of those jobs",
            f["load_wall"],
            "s",
            note=f"ratio: cores used; {f['load_cpu'] / N * 1e6:.0f} us CPU per job in the supervisor's process, "
            "submitting thread included",
        ),
    ]
