"""Chaos: 2,000 jobs while the worker is SIGKILLed at random moments about
20 times. Every Future resolves exactly once, every result is right, and
with ``retries=1`` every job succeeds. The figures go to the test's output
(``pytest -s`` shows them)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from supervisor import Supervisor, WorkerCrashed
from tests.helpers import T, wait_until
from tests.helpers.config import config_text

pytestmark = pytest.mark.process

JOBS = 2000
KILLS = 20

CONFIG = config_text(supervisor={"heartbeat_interval": 0.2, "max_restarts": 1000, "restart_backoff": 0.0})


def _kill_at_random(sup: Supervisor, rng: random.Random, every: int, all_done: threading.Event) -> int:
    """SIGKILL the worker KILLS times, each after at least ``every`` more jobs
    have finished (so a retried job has run before the next kill), at a
    random moment: mid-job or between jobs, whatever the loop is doing."""
    kills = 0
    while kills < KILLS and not all_done.is_set():
        base = sup.status()["jobs_done"]
        wait_until(lambda b=base: sup.status()["jobs_done"] >= b + every or all_done.is_set(), T, "progress")
        time.sleep(rng.uniform(0, 0.003))
        status = sup.status()
        if status["worker_state"] not in ("ready", "busy") or all_done.is_set():
            continue
        os.kill(status["worker_pid"], signal.SIGKILL)
        kills += 1
        wait_until(lambda k=kills: sup.status()["restarts"] >= k, T, "the kill to be noticed")
    return kills


@pytest.mark.parametrize("retries", [0, 1])
def test_chaos_every_job_ends_exactly_once_and_retries_make_every_job_succeed(write_config, retries):
    rng = random.Random(20261124 + retries)
    sup = Supervisor(write_config(CONFIG)).start()
    try:
        sup.switch_mode("diag").result(T)
        outcomes: Counter = Counter()
        results: dict[int, object] = {}
        lock = threading.Lock()
        all_done = threading.Event()

        def record(i: int):
            def done(f):
                with lock:
                    outcomes[i] += 1
                    results[i] = f.exception() or f.result()
                    if len(results) == JOBS:
                        all_done.set()

            return done

        futures = []
        for i in range(JOBS):
            f = sup.submit("echo", {"i": i, "pad": "x" * rng.randrange(0, 2000)}, retries=retries)
            f.add_done_callback(record(i))
            futures.append(f)
        kills = _kill_at_random(sup, rng, every=JOBS // (KILLS * 2), all_done=all_done)
        assert all_done.wait(2 * T), f"only {len(results)} of {JOBS} jobs ended"

        assert set(outcomes.values()) == {1}, "every Future resolves exactly once"
        failed = {i: r for i, r in results.items() if isinstance(r, BaseException)}
        for i, r in results.items():
            if i not in failed:
                assert r["i"] == i, f"job {i} got job {r['i']}'s result"
        assert all(isinstance(e, WorkerCrashed) for e in failed.values())
        if retries:
            assert failed == {}, f"{len(failed)} jobs failed despite retries=1: {list(failed.items())[:3]}"
        assert len(failed) <= kills
        wait_until(lambda: sup.status()["restarts"] == kills, T, "the restart count to settle")
        print(
            f"\nchaos retries={retries}: {JOBS} jobs, {kills} SIGKILLs, {sup.status()['restarts']} restarts, "
            f"{JOBS - len(failed)} results (all correct), {len(failed)} WorkerCrashed, 0 lost, 0 doubled"
        )
        assert kills >= KILLS * 0.75, f"the test meant to kill about {KILLS} times, managed {kills}"
    finally:
        sup.shutdown(drain=False)
