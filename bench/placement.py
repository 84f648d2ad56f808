"""Several devices: mode-aware placement against the same jobs placed by hand.

3 CPU device slots, 4 modes. Each mode is the diag mode with a warm-up that
sleeps 0.5 s, standing in for a model's load, so a switch costs what a
small model's would. 4 callers each submit 40 jobs of 20 ms, their modes
drawn at random (seeded), all at once, then wait for every outcome.

* **Placed by the supervisor**: one supervisor over ``devices = ["cpu",
  "cpu", "cpu"]``, each job naming its mode and nothing else.
* **Placed by hand** (the baseline): three supervisors of one device each;
  the two busiest modes get a device each, the other two share the third,
  one after the other; each mode's jobs go to its device grouped. This is
  what an operator with perfect knowledge of the load would do.

Goal: <= 1.3 x the time by hand. Printed beside it: the switches each made
and how the jobs spread over the devices.
"""

from __future__ import annotations

import collections
import functools
import random
import time

from prometheus_client.parser import text_string_to_metric_families

from bench.common import config, run_callers
from bench.report import Row, progress
from supervisor import Supervisor
from supervisor.config import ModeSpec

MODES = "abcd"
CALLERS = 4
JOBS = 40  # per caller
JOB_S = 0.02
LOAD_S = 0.5  # each mode's warm-up: a switch costs at least this


def _modes() -> dict[str, ModeSpec]:
    warm = {"task": "sleep", "payload": {"seconds": LOAD_S}}
    return {m: ModeSpec(m, "worker.modes.diag:load", warmup=warm) for m in MODES}


def _plans() -> list[list[str]]:
    rng = random.Random(15)
    return [[rng.choice(MODES) for _ in range(JOBS)] for _ in range(CALLERS)]


def _switches(sup: Supervisor) -> int:
    samples = (s for family in text_string_to_metric_families(sup.metrics()) for s in family.samples)
    return int(sum(s.value for s in samples if s.name == "gpuvisor_switches_total" and s.labels["outcome"] == "loaded"))


def placed() -> tuple[float, int, list[int]]:
    cfg = config(modes=_modes(), default_mode="", devices=("cpu", "cpu", "cpu"), warm_standby=False)
    with Supervisor(cfg) as sup:
        callers = [functools.partial(_submit_all, sup, plan) for plan in _plans()]
        seconds, _ = run_callers(callers, timeout=300)
        spread = [d["jobs_done"] for d in sup.status()["devices"]]
        return seconds, _switches(sup), spread


def _submit_all(sup: Supervisor, plan: list[str]) -> list:
    return [sup.submit("sleep", {"seconds": JOB_S}, mode=m) for m in plan]


def by_hand() -> tuple[float, int]:
    counts = collections.Counter(m for plan in _plans() for m in plan)
    order = [m for m, _ in counts.most_common()]
    lanes = [[order[0]], [order[1]], order[2:]]  # the two busiest alone, the rest share
    settings = {"default_mode": "", "device": "cpu", "warm_standby": False}
    sups = [Supervisor(config(modes=_modes(), **settings)).start() for _ in lanes]
    try:
        t = time.perf_counter()
        futures = [
            sup.submit("sleep", {"seconds": JOB_S}, mode=m)
            for sup, lane in zip(sups, lanes, strict=True)
            for m in lane
            for _ in range(counts[m])
        ]
        for f in futures:
            f.result(300)
        seconds = time.perf_counter() - t
        return seconds, sum(_switches(s) for s in sups)
    finally:
        for s in sups:
            s.shutdown()


def run() -> list[Row]:
    progress(f"placement: {CALLERS} callers x {JOBS} jobs, {len(MODES)} modes, 3 CPU devices ...")
    seconds, switches, spread = placed()
    hand_s, hand_switches = by_hand()
    title = f"{CALLERS}x{JOBS} jobs, 4 modes on 3 devices, placed (s)"
    note = f"switches: {switches} placed, {hand_switches} by hand; jobs per device {spread}"
    extra = {"switches": switches, "hand_switches": hand_switches, "spread": spread}
    return [Row(title, seconds, "the same jobs placed by hand", hand_s, "s", limit=1.3, note=note, extra=extra)]
