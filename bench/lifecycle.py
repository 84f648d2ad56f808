"""Mode switch against its floor, drain time, and the supervisor's own
footprint. The floor for a switch to ``embed`` is loading the same model in a
process that has already imported torch and transformers."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from bench.report import Row, median
from supervisor import Supervisor

SWITCHES = 3

_FLOOR = """
import time, torch, transformers, worker.modes.embed as e
loads = []
for _ in range(int(__import__('sys').argv[1])):
    t = time.perf_counter(); h = e.load(device="cpu"); h["embed"]({"texts": ["warm"]}); loads.append(time.perf_counter() - t)
print(min(loads))
"""


def load_floor() -> float:
    out = subprocess.run(
        [sys.executable, "-c", _FLOOR, str(SWITCHES)], capture_output=True, text=True, check=True, timeout=600
    )
    return float(out.stdout.strip().splitlines()[-1])


def switches() -> tuple[list[float], float, float, float]:
    me = psutil.Process()
    cpu0 = me.cpu_times()
    to_embed = []
    with Supervisor() as sup:
        sup.switch_mode("diag").result(60)
        idle_rss = me.memory_info().rss
        for _ in range(SWITCHES):
            t = time.perf_counter()
            sup.switch_mode("embed").result(600)
            sup.submit("embed", {"texts": ["warm"]}).result(60)
            to_embed.append(time.perf_counter() - t)
            sup.switch_mode("diag").result(60)
        for _ in range(5000):
            sup.submit("echo", {"payload": "x" * 100})
        sup.submit("echo").result(120)
        busy_rss = me.memory_info().rss
    cpu1 = me.cpu_times()
    return to_embed, idle_rss / 2**20, busy_rss / 2**20, (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)


def drain_times() -> tuple[float, float, float]:
    n, job_s = 20, 0.02
    sup = Supervisor().start()
    sup.switch_mode("diag").result(60)
    t = time.perf_counter()
    sup.shutdown()
    idle = time.perf_counter() - t
    sup = Supervisor().start()
    sup.switch_mode("diag").result(60)
    for _ in range(n):
        sup.submit("sleep", {"seconds": job_s})
    t = time.perf_counter()
    sup.shutdown()
    queued = time.perf_counter() - t
    return idle, queued, n * job_s


def run() -> list[Row]:
    floor = load_floor()
    to_embed, idle_rss, busy_rss, cpu = switches()
    idle, queued, ideal = drain_times()
    return [
        Row(
            "switch diag -> embed (+1 job), best",
            min(to_embed),
            "load in a warm process (floor)",
            floor,
            " s",
            "<= floor + 0.3 s",
        ),
        Row("switch diag -> embed (+1 job), median", median(to_embed), "load in a warm process (floor)", floor, " s"),
        Row("shutdown, idle worker", idle, "(goal 0.3 s)", 0.3, " s", "<= 0.3 s"),
        Row("shutdown, 20 x 20 ms jobs queued", queued, "20 x job time", ideal, " s"),
        Row("supervisor RSS, idle (bench process)", idle_rss, "(goal 60 MB)", 60.0, "MB", "<= 60 MB"),
        Row("supervisor RSS after 5,000 jobs", busy_rss, "(goal 60 MB)", 60.0, "MB"),
        Row("supervisor CPU, 3 switches + 5,000 jobs", cpu, "(reference 1 s)", 1.0, " s"),
    ]
