"""A worker's output reaches the daemon's log within a budget: about
``STDERR_RATE`` bytes a second after a burst of ``STDERR_BURST``, in whole
lines; the rest is dropped, and a log line says how many bytes. Its crash
report still has its last lines. What it prints (stdout) counts as stderr.

The budget itself is stepped by hand; the flood is a real handler printing
in a loop in a real daemon's worker."""

from __future__ import annotations

import os
import re
import time

import pytest

from supervisor import WorkerCrashed
from supervisor.engine.stderr import STDERR_BURST, STDERR_RATE, StderrBudget
from tests.helpers import T, wait_until
from tests.helpers.config import config_text

LINE = "flood {:08d} " + "x" * 113  # 128 bytes with its newline
LINES = 200_000  # 25.6 MB: more than the budget passes in the seconds it takes, on any machine this runs on
PIPE = 64 * 1024  # what may still wait in the worker's pipe when its job is answered


def load() -> dict:
    """Run in the worker: a handler that prints in a loop, one that says
    something, one that says its last words and dies."""

    def flood(payload: int) -> int:
        for i in range(payload):
            print(LINE.format(i))
        return payload * (len(LINE.format(0)) + 1)

    def say(payload: str) -> str:
        print(payload)
        return payload

    def crash(payload: str) -> None:
        print(payload)
        os.kill(os.getpid(), 9)

    return {"flood": flood, "say": say, "crash": crash}


@pytest.mark.unit
def test_the_budget_passes_a_burst_then_its_rate_and_never_more_than_a_burst():
    budget = StderrBudget(now=100.0, rate=1000, burst=4000)
    assert budget.take(10_000, 100.0) == 4000
    assert budget.take(1, 100.0) == 0
    assert budget.take(10_000, 100.5) == 500
    budget.give_back(200)
    assert budget.take(10_000, 100.5) == 200
    assert budget.take(10_000, 1000.0) == 4000, "a long quiet spell refills one burst, no more"
    assert budget.take(10, 999.0) == 0, "a clock that steps back gives nothing"


@pytest.mark.daemon
def test_a_handler_printing_in_a_loop_is_passed_on_within_the_budget_and_the_rest_is_counted(daemon):
    d = daemon(config_text=config_text({"noisy": f"{__name__}:load"}, supervisor={"warm_standby": False}))
    with d.client() as c:
        c.switch_mode("noisy").result(T)
        began = time.monotonic()
        total = c.submit("flood", LINES).result(T)
        took = time.monotonic() - began
        with pytest.raises(WorkerCrashed) as crashed:
            c.submit("crash", "the last words after the flood").result(T)
        assert "the last words after the flood" in crashed.value.details["stderr_tail"], "the tail keeps them"
        c.submit("say", "a fresh worker has a budget of its own").result(T)
    # One thread writes every worker's output in order: the next worker's line out means the flood's are out too.
    wait_until(lambda: "a fresh worker has a budget of its own" in d.output(), T, "the next worker's line")
    said = wait_until(lambda: re.findall(r"dropped ([\d,]+) bytes of the stderr of worker gen 1 pid \d+ in", d.output()),
                      T, "the line that says how much was dropped")  # fmt: skip
    dropped = sum(int(n.replace(",", "")) for n in said)
    # Within the budget but not written: our stderr did not keep up (never on a file, unless the machine crawls).
    behind = sum(int(n) for n in re.findall(r"\[gpuvisor: (\d+) bytes of worker stderr dropped", d.output()))
    lines = [line for line in d.output().splitlines() if "flood " in line]
    passed = sum(len(line) + 1 for line in lines)
    assert passed <= STDERR_BURST + STDERR_RATE * took + PIPE, f"{passed:,} bytes passed on in {took:.1f} s"
    # Give or take a few lines: the worker's own, a line cut by the budget or split by a log line between writes.
    assert passed + behind + dropped >= total - 4096, "every byte not passed on is counted"
    assert dropped <= total - passed + 4096, "and only those"
    assert all(line.count("flood ") == 1 for line in lines), "never the start of one line glued to another's end"
