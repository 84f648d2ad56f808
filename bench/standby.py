"""The warm standby: no cold first switch, and no slower work behind it.

* **First switch to embed after start.** A Supervisor with the built-in
  config (whose torch modes name a ``preload``) starts a spare at once; the
  bench waits until it is ready (printed: the spare's imports at start, as
  the status shows them, which is refreshed at least once a second),
  then times ``switch_mode("embed")`` against the load floor of
  ``bench.lifecycle`` (loading the model in a warm process), measured in
  the same run. Goal: within 0.3 s of the floor.
* **10 x 32 sentences right after a warm switch.** diag, wait for the spare,
  switch to embed (it takes the spare, and a new spare starts importing at
  once), then at once 10 jobs of 32 sentences, each sent when the last
  answered; against the same 10 calls in one warm process (the model loaded
  and run once; the faster of a run before and one after). Goal: <= 1.3 x. The same is run with pacing off (the spare
  imports while the jobs run, in its thread at the lowest CPU priority,
  never stopped), for the difference, and the spare's process state (/proc)
  is sampled while the jobs run.
* **diag while the first spare imports.** A Supervisor with the built-in
  config starts a spare at once; diag loads and a caller keeps 4 jobs of
  10 ms waiting for ``FIRST_SECONDS``, while the spare imports beside that
  light worker (at the lowest CPU priority, never stopped); diag's jobs/s
  against the same with ``warm_standby = false``. Goal: >= 0.97 x.
"""

from __future__ import annotations

import json
import time

from bench import lifecycle
from bench.common import child, config
from bench.report import Row, median, progress
from supervisor import Supervisor
from supervisor.engine import standby

BATCHES = 10
REPS = 3
FIRST_SECONDS = 6.0  # about what the first spare's imports take beside diag here
SENTENCES = [
    f"Sentence {i}: the supervisor keeps GPU work in a child process it can kill, and this one is number {i}."
    for i in range(32)
]

_WARM = """
import json, sys, time
import worker.modes.embed as e
texts = json.loads(sys.argv[1]); n = int(sys.argv[2])
h = e.load(device="cpu")
embed = h["embed"]
one = (lambda p: embed([p])[0]) if hasattr(embed, "gpuvisor_batch") else embed  # a batch handler takes a list
one({"texts": texts})
t = time.perf_counter()
for _ in range(n):
    one({"texts": texts})
print(json.dumps(time.perf_counter() - t))
"""


def warm_process() -> float:
    """The 10 calls in one process that has loaded the model and run it once."""
    import subprocess

    with child(_WARM, json.dumps(SENTENCES), str(BATCHES), stdout=subprocess.PIPE, text=True) as proc:
        out, _ = proc.communicate(timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def _state(pid: int | None) -> str:
    """The process's state letter in /proc (T: stopped), or '-' if gone."""
    if pid is None:
        return "-"
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "-"


def first_switch() -> tuple[float, float, dict]:
    """(seconds until the spare started with the supervisor is ready, the
    first switch to embed, its result)."""
    with Supervisor() as sup:
        ready = lifecycle.wait_ready(sup)
        t = time.perf_counter()
        result = sup.switch_mode("embed").result(600)
        seconds = time.perf_counter() - t
        sup.submit("embed", {"texts": ["it works"]}).result(60)
    return ready, seconds, dict(result)


def work_after_switch(paced: bool = True) -> tuple[float, dict, list[str]]:
    """(the 10 jobs' seconds, the switch's result, the new spare's state
    after each job). ``paced=False``: the spare starts at once and is never
    stopped: only its lowest CPU priority keeps it from the worker."""
    saved = standby.RESUME_AFTER_IDLE_S
    if not paced:
        standby.RESUME_AFTER_IDLE_S = float("-inf")  # read by the loop thread at each turn
    try:
        with Supervisor() as sup:
            sup.switch_mode("diag").result(600)
            lifecycle.wait_ready(sup)
            result = sup.switch_mode("embed").result(600)
            states = []
            t = time.perf_counter()
            for _ in range(BATCHES):
                sup.submit("embed", {"texts": SENTENCES}).result(600)
                states.append(_state(sup.status()["standby_pid"]))
            seconds = time.perf_counter() - t
    finally:
        standby.RESUME_AFTER_IDLE_S = saved
    return seconds, dict(result), states


def diag_beside_first_spare(spare: bool) -> tuple[float, bool]:
    """(diag's jobs/s in its first ``FIRST_SECONDS``, 4 jobs of 10 ms always
    waiting, whether the spare was ready by the end). ``spare=False``:
    ``warm_standby = false``."""
    with Supervisor(config(warm_standby=spare)) as sup:
        sup.switch_mode("diag").result(600)
        done, window = 0, []
        t = time.perf_counter()
        while time.perf_counter() - t < FIRST_SECONDS:
            window.append(sup.submit("sleep", {"seconds": 0.01}))
            if len(window) >= 4:
                window.pop(0).result(60)
                done += 1
        for f in window:
            f.result(60)
            done += 1
        return done / (time.perf_counter() - t), sup.status()["standby_ready"]


def _each(xs: list[float]) -> str:
    return ", ".join(f"{x:.3f}s" for x in xs)


def run() -> list[Row]:
    first_load, *floor_loads = lifecycle.load_floor()
    floor = median(floor_loads)
    progress(f"standby: floor, embed load in a warm process: {_each(floor_loads)}")
    readies, firsts, results = [], [], []
    warms, paced, unpaced, states, unpaced_states, switch_results = [], [], [], [], [], []
    beside, alone, ready_by_end = [], [], []
    for _ in range(REPS):  # interleaved, the best of each: the machine is shared, and noise only adds
        ready, first, result = first_switch()
        readies.append(ready)
        firsts.append(first)
        results.append(result)
        progress(
            f"standby: spare ready {ready:.2f}s after start; first switch to embed {first:.3f}s "
            f"(standby {result.get('standby')}, load {result.get('load_seconds', 0):.3f}s)"
        )
        warms.append(warm_process())
        seconds, result, seen = work_after_switch()
        paced.append(seconds)
        switch_results.append(result)
        states.append("".join(seen))
        seconds, _, seen = work_after_switch(paced=False)
        unpaced.append(seconds)
        unpaced_states.append("".join(seen))
        progress(
            f"standby: {BATCHES} x 32 sentences: one warm process {warms[-1]:.3f}s, right after a warm switch "
            f"{paced[-1]:.3f}s (the spare after each job: {states[-1]}), with the spare never stopped "
            f"{unpaced[-1]:.3f}s ({unpaced_states[-1]})"
        )
        rate, ready = diag_beside_first_spare(spare=True)
        beside.append(rate)
        ready_by_end.append(ready)
        alone.append(diag_beside_first_spare(spare=False)[0])
        progress(
            f"standby: diag in its first {FIRST_SECONDS:g}s: {beside[-1]:.1f} jobs/s while the first spare "
            f"imports (ready by the end: {ready}), {alone[-1]:.1f} with none"
        )
    best = firsts.index(min(firsts))
    warm = min(warms)
    return [
        Row(
            "first switch to embed after start",
            firsts[best],
            "embed load in a warm process",
            floor,
            "s",
            limit=0.3,
            on="excess",
            note=f"over the floor: {firsts[best] - floor:+.3f}s; best of {_each(firsts)}; the spare was ready "
            f"{', '.join(f'{r:.1f}s' for r in readies)} after start; phases: {lifecycle.phases(results[best])}",
            extra={"results": results, "ready_after_start": readies, "floor_loads": floor_loads},
        ),
        Row(
            f"{BATCHES} x 32 sentences right after a warm switch",
            min(paced),
            "the same in one warm process",
            warm,
            "s",
            limit=1.3,
            note=f"best of {_each(paced)} against {_each(warms)}; the next spare after each job: {', '.join(states)} "
            f"(T: stopped); with the spare never stopped: {_each(unpaced)}, best {min(unpaced) / warm:.2f}x",
            extra={
                "paced": paced,
                "warm": warms,
                "unpaced": unpaced,
                "states": states,
                "unpaced_states": unpaced_states,
                "switches": switch_results,
            },
        ),
        Row(
            f"diag in its first {FIRST_SECONDS:g}s, the first spare importing (jobs/s)",
            max(beside),
            "the same with warm_standby = false",
            max(alone),
            "jobs/s",
            limit=0.97,
            higher_is_better=True,
            note=f"best of {', '.join(f'{x:.1f}' for x in beside)} against {', '.join(f'{x:.1f}' for x in alone)} "
            f"jobs/s; the spare ready by the end: {ready_by_end}",
            extra={"beside": beside, "alone": alone, "ready_by_end": ready_by_end},
        ),
    ]
