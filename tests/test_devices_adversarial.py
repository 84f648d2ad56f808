"""An adversarial look at several devices under one supervisor, with three
CPU device slots: barriers across devices, restarts, cancels, shutdowns,
jobs that name no mode, idle unloads, batches, retries, OOM recycles,
failed loads, a window, the replicas limit under load and deadlines. Every
job must end with exactly one outcome and every worker must be reaped.

The ``stamped`` loader below is imported by the workers (the tests put the
repository on PYTHONPATH): its ``work`` says which mode ran it, in which
process, and when it started and ended on the machine's monotonic clock,
which every process shares. Only the order of such instants is asserted,
where the engine's rules make that order causal; no duration is."""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from concurrent.futures import CancelledError, Future

import pytest

from protocol import JobCancelled, JobTimeout, ModeLoadError, OutOfMemory, WorkerCrashed
from supervisor import Supervisor
from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import DIAG, DIAG_HOOKS, config_text

pytestmark = pytest.mark.process

THREE = ["cpu", "cpu", "cpu"]
NAMES = ["cpu:0", "cpu:1", "cpu:2"]
HERE = __name__


# ------------------------------------------------------------------ loaders (run in the workers)


def stamped(tag: str, flag: str = "") -> dict:
    """``work`` sleeps ``payload`` seconds and says which mode ran it, in
    which process, and when it started and ended. With ``flag``: the load
    fails while that file exists (a device that cannot hold the mode)."""
    if flag and os.path.exists(flag):
        raise RuntimeError(f"{tag}: cannot load while {flag} exists")

    def work(payload: float) -> dict:
        start = time.monotonic()
        time.sleep(payload or 0)
        return {"tag": tag, "pid": os.getpid(), "start": start, "end": time.monotonic()}

    return {"work": work}


# ------------------------------------------------------------------ helpers


def mode(tag: str, **more) -> dict:
    return {"loader": f"{HERE}:stamped", "args": {"tag": tag}, **more}


def three(modes: dict, **settings) -> str:
    return config_text(modes, supervisor={"devices": THREE, "warm_standby": False, **settings})


def by_device(sup: Supervisor) -> dict[str, dict]:
    return {d["name"]: d for d in sup.status()["devices"]}


def outcomes(future: Future) -> list:
    """Every outcome ``future`` is given, as it is given (a Future settles
    once; a second settle would raise on the loop thread and show here as a
    missing outcome or a crashed loop)."""
    seen: list = []
    future.add_done_callback(lambda f: seen.append("cancelled" if f.cancelled() else f.exception() or "ok"))
    return seen


def one_mode_each(sup: Supervisor) -> None:
    """``a`` on cpu:0, ``b`` on cpu:1, ``c`` on cpu:2."""
    for m, name in zip("abc", NAMES, strict=True):
        sup.switch_mode(m, device=name).result(T)


def worker_pids(sup: Supervisor) -> set[int]:
    return {d["worker_pid"] for d in sup.status()["devices"] if d["worker_pid"]}


def all_reaped(pids) -> bool:
    return all(pid_gone(p) for p in pids)


# ------------------------------------------------------------------ restart()


def test_restart_of_no_mode_restarts_the_mode_in_force_where_it_is_held(supervisor_from):
    """``restart()`` names neither mode nor device: no device is failed, so
    it restarts the mode in force on the device that holds it (docs/
    scaling.md: "else one holding the mode"), never an empty device."""
    sup: Supervisor = supervisor_from(three({"a": mode("a")}))
    first = sup.submit("work", 0, mode="a").result(T)
    holder = next(n for n, d in by_device(sup).items() if d["worker_pid"] == first["pid"])
    got = sup.restart().result(T)
    assert got["status"] == "restarted" and got["mode"] == "a", got
    devices = by_device(sup)
    assert devices[holder]["mode"] == "a" and devices[holder]["worker_pid"] != first["pid"]
    assert [n for n, d in devices.items() if d["mode"] == "a"] == [holder]


def test_restart_of_a_held_mode_restarts_it_on_its_device_not_on_another(supervisor_from):
    """``restart("a")`` with ``a`` held by one device (``replicas = 1``):
    that device's worker is replaced; no second device loads ``a``."""
    sup: Supervisor = supervisor_from(three({"a": mode("a"), "b": mode("b")}))
    first = sup.submit("work", 0, mode="a").result(T)
    holder = next(n for n, d in by_device(sup).items() if d["worker_pid"] == first["pid"])
    got = sup.restart("a").result(T)
    assert got["status"] == "restarted" and got["mode"] == "a", got
    devices = by_device(sup)
    assert [n for n, d in devices.items() if d["mode"] == "a"] == [holder], devices
    assert devices[holder]["worker_pid"] == got["pid"] != first["pid"]


# ------------------------------------------------------------------ jobs that name no mode


def test_a_job_naming_no_mode_after_switch_mode_to_a_mode_already_held_runs_in_it(supervisor_from):
    """``switch_mode("a")`` answered ``already_loaded`` (``a`` is held on
    one device, ``b`` was put in force later on another): a job submitted
    after it that names no mode runs in ``a``, as the caller just asked,
    like on one device."""
    sup: Supervisor = supervisor_from(three({"a": mode("a"), "b": mode("b")}))
    assert sup.switch_mode("a", device="cpu:0").result(T)["status"] == "loaded"
    assert sup.switch_mode("b", device="cpu:1").result(T)["status"] == "loaded"
    assert sup.submit("work", 0).result(T)["tag"] == "b", "the mode most recently put in force"
    assert sup.switch_mode("a").result(T)["status"] == "already_loaded"
    assert sup.submit("work", 0).result(T)["tag"] == "a", (
        "switch_mode('a') said a is loaded; the next job ran elsewhere"
    )


def test_a_crash_on_another_device_does_not_change_the_mode_of_jobs_naming_none(supervisor_from):
    """``b`` is the mode most recently put in force; the worker of ``a`` on
    another device dies and is respawned. That respawn puts nothing new in
    force: jobs naming no mode still run in ``b``."""
    sup: Supervisor = supervisor_from(three({"a": mode("a"), "b": mode("b")}))
    a = sup.switch_mode("a", device="cpu:0").result(T)
    sup.switch_mode("b", device="cpu:1").result(T)
    assert sup.submit("work", 0).result(T)["tag"] == "b"
    os.kill(a["pid"], signal.SIGKILL)
    wait_until(lambda: by_device(sup)["cpu:0"]["restarts"] == 1, T, "the death on cpu:0 to be counted")
    # The respawn of a happens when a job needs it: one does.
    assert sup.submit("work", 0, mode="a").result(T)["tag"] == "a"
    assert by_device(sup)["cpu:0"]["mode"] == "a"
    assert sup.submit("work", 0).result(T)["tag"] == "b", "a respawn of a on cpu:0 took over the mode in force"


def test_jobs_naming_no_mode_follow_the_callers_switches_across_devices(supervisor_from):
    """One caller, switches that name their devices, then jobs that name
    no mode: each runs in the mode the caller's last switch (or named job)
    put ahead of it, whichever device holds it."""
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    plan = [("switch", "a", "cpu:2"), ("job", None), ("job", None), ("switch", "b", "cpu:0"), ("job", None),
            ("job", "c"), ("job", None), ("switch", "a", None), ("job", None), ("switch", "b", "cpu:1"),
            ("job", None)]  # fmt: skip
    expected = ["a", "a", "b", "c", "c", "a", "b"]
    futures = []
    for step in plan:
        if step[0] == "switch":
            sup.switch_mode(step[1], device=step[2])
        else:
            futures.append(sup.submit("work", 0.05, mode=step[1]))
    assert [f.result(T)["tag"] for f in futures] == expected


# ------------------------------------------------------------------ barriers


def test_a_barrier_for_one_device_waits_for_jobs_before_it_that_only_another_may_run(supervisor_from):
    """``a`` may run only on cpu:0, which is busy; a second ``a`` job waits
    for it. A switch of cpu:1 queued after both waits until the second is
    handed out, and so does every job behind it, on every device: the job
    after the barrier starts after the first ``a`` job ended."""
    sup: Supervisor = supervisor_from(three({"a": mode("a", devices=["cpu:0"]), "b": mode("b"), "c": mode("c")}))
    sup.switch_mode("a").result(T)
    first = sup.submit("work", 0.8, mode="a")
    wait_until(lambda: by_device(sup)["cpu:0"]["in_flight"] == 1, T, "the first a job to run")
    second = sup.submit("work", 0, mode="a")
    switch = sup.switch_mode("b", device="cpu:1")
    after = sup.submit("work", 0, mode="c")
    same = sup.submit("work", 0, mode="b")
    one, two, moved, c, b = first.result(T), second.result(T), switch.result(T), after.result(T), same.result(T)
    assert (one["tag"], two["tag"], c["tag"], b["tag"]) == ("a", "a", "c", "b")
    assert c["start"] > one["end"] and b["start"] > one["end"], "a job behind the barrier ran before it"
    assert moved["status"] == "loaded" and b["pid"] == moved["pid"] == by_device(sup)["cpu:1"]["worker_pid"]


def test_switch_mode_of_a_busy_device_waits_for_its_job_and_holds_back_the_jobs_after_it(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    sup.switch_mode("a", device="cpu:1").result(T)
    running = sup.submit("work", 0.8, mode="a")
    wait_until(lambda: by_device(sup)["cpu:1"]["in_flight"] == 1, T, "the a job to run on cpu:1")
    switch = sup.switch_mode("b", device="cpu:1")
    later = [sup.submit("work", 0, mode=m) for m in "cab"]
    seen = [outcomes(f) for f in [running, switch, *later]]
    ran = running.result(T)
    moved = switch.result(T)
    got = [f.result(T) for f in later]
    assert ran["tag"] == "a" and moved["status"] == "loaded"
    assert [g["tag"] for g in got] == ["c", "a", "b"]
    assert all(g["start"] > ran["end"] for g in got), "a job behind the switch of cpu:1 ran while cpu:1 was busy"
    assert got[2]["pid"] == moved["pid"] == by_device(sup)["cpu:1"]["worker_pid"]
    assert all(s == ["ok"] for s in seen)


def test_mixed_callers_with_barriers_keep_order_per_mode_and_nothing_overtakes_a_barrier(supervisor_from):
    """Three callers send jobs of four modes (one replica each); the first
    also sends switches, unnamed to the job modes and named to devices for a
    mode no job uses. With one replica a mode's jobs run one after another,
    so their instants are ordered: per mode no two overlap; each caller's
    jobs of a mode start in the order it sent them; and a caller's job sent
    after its switch starts after every job it sent before the switch
    ended, but the last of each mode, which may run as the barrier is
    taken."""
    modes = {m: mode(m) for m in "abcd"}
    modes["s"] = mode("s", replicas=3)
    sup: Supervisor = supervisor_from(three(modes, max_wait_s=0.2))
    rng = random.Random(1515)
    plans = []
    for n in range(3):
        plan: list[tuple] = []
        for i in range(36):
            if n == 0 and i % 6 == 5:  # a switch to "s" names its device; to a job mode, none (replicas stay 1)
                target = rng.choice("abcds")
                plan.append(("switch", target, rng.choice(NAMES) if target == "s" else None))
            else:
                plan.append(("job", rng.choice("abcd"), rng.choice([0, 0, 0.02])))
        plans.append(plan)
    sent: list[list[tuple]] = [[] for _ in plans]

    def caller(n: int) -> None:
        for step in plans[n]:
            if step[0] == "switch":
                sent[n].append(("switch", step[1], sup.switch_mode(step[1], device=step[2])))
            else:
                sent[n].append(("job", step[1], sup.submit("work", step[2], mode=step[1])))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    results: list[list[tuple]] = []
    for n in range(3):
        results.append([(kind, m, f.result(3 * T)) for kind, m, f in sent[n]])
    jobs = [(m, r) for rows in results for kind, m, r in rows if kind == "job"]
    assert len(jobs) == sum(1 for p in plans for s in p if s[0] == "job")
    for m, r in jobs:
        assert r["tag"] == m, f"a job for {m} ran in {r['tag']}"
    for m in "abcd":  # one replica: a mode's jobs never overlap, whichever device runs them
        spans = sorted((r["start"], r["end"]) for mm, r in jobs if mm == m)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), f"two jobs of {m} overlapped"
    for rows in results:
        for m in "abcd":
            starts = [r["start"] for kind, mm, r in rows if kind == "job" and mm == m]
            assert starts == sorted(starts), f"a caller's jobs of {m} ran out of its order"
    rows = results[0]
    for k, (kind, _, _) in enumerate(rows):
        if kind != "switch":
            continue
        before = [(m, r) for knd, m, r in rows[:k] if knd == "job"]
        after = [r for knd, m, r in rows[k + 1 :] if knd == "job"]
        last = {m: max(r["start"] for mm, r in before if mm == m) for m in {m for m, _ in before}}
        settled = [r["end"] for m, r in before if r["start"] < last[m]]
        for r in after:
            assert all(r["start"] > end for end in settled), f"a job sent after switch {k} overtook it"


# ------------------------------------------------------------------ cancels


def produced(record) -> list[str]:
    return record.read_text().split() if record.exists() else []


def test_streams_on_the_third_device_cancel_running_and_queued(supervisor_from, tmp_path):
    """``diag`` lives on cpu:2 while the other devices hold other modes: a
    running stream cancelled there stops in its worker, which serves on; a
    queued stream cancelled never runs; a stream left by its reader stops
    too; the other devices' workers never notice."""
    sup: Supervisor = supervisor_from(three({"diag": DIAG_HOOKS, "a": mode("a"), "b": mode("b")}))
    sup.switch_mode("a", device="cpu:0").result(T)
    sup.switch_mode("b", device="cpu:1").result(T)
    pid = sup.switch_mode("diag", device="cpu:2").result(T)["pid"]
    others = {n: by_device(sup)[n]["worker_pid"] for n in ("cpu:0", "cpu:1")}
    record, queued_record, left_record = tmp_path / "r", tmp_path / "q", tmp_path / "l"
    stream = sup.submit("count", {"n": 100000, "delay": 0.01, "record": str(record)}, stream=True, mode="diag")
    queued = sup.submit("count", {"n": 3, "record": str(queued_record)}, stream=True, mode="diag")
    seen = [outcomes(stream.future), outcomes(queued.future)]
    assert [next(stream), next(stream)] == [0, 1]
    assert by_device(sup)["cpu:2"]["in_flight"] == 1
    assert queued.cancel() is True and queued.future.cancelled()
    assert stream.cancel() is True and stream.future.cancelled()
    wait_until(lambda: "closed" in produced(record), T, "the generator in cpu:2's worker to close")
    with pytest.raises(CancelledError):
        stream.result(T)
    left = sup.submit("count", {"n": 100000, "delay": 0.01, "record": str(left_record)}, stream=True, mode="diag")
    for chunk in left:
        if chunk == 2:
            break
    wait_until(lambda: "closed" in produced(left_record), T, "the stream left by its reader to stop")
    assert left.future.cancelled()
    assert sup.submit("pid", mode="diag").result(T) == pid, "cpu:2's worker serves on"
    assert not queued_record.exists(), "the cancelled queued stream ran"
    assert seen == [["cancelled"], ["cancelled"]]
    devices = by_device(sup)
    assert {n: devices[n]["worker_pid"] for n in others} == others
    assert sum(d["restarts"] for d in devices.values()) == 0


def test_a_stream_waiting_in_the_window_of_the_second_device_is_stopped_when_it_starts(supervisor_from, tmp_path):
    """``window = 4``: a stream handed to cpu:1's worker behind a running job
    and cancelled there stops at its first chunk; its Future is cancelled
    at once, the job ahead of it is answered, the worker serves on."""
    sup: Supervisor = supervisor_from(three({"diag": DIAG_HOOKS, "a": mode("a")}, window=4))
    sup.switch_mode("a", device="cpu:0").result(T)
    pid = sup.switch_mode("diag", device="cpu:1").result(T)["pid"]
    record = tmp_path / "r"
    ahead = sup.submit("sleep", {"seconds": 0.6}, mode="diag")
    stream = sup.submit("count", {"n": 100000, "delay": 0.01, "record": str(record)}, stream=True, mode="diag")
    seen = outcomes(stream.future)
    wait_until(lambda: by_device(sup)["cpu:1"]["in_flight"] == 2, T, "both jobs handed to cpu:1's worker")
    assert stream.cancel() is True and stream.future.cancelled()
    assert ahead.result(T) == {"slept": 0.6}
    wait_until(lambda: "closed" in produced(record), T, "the stopped stream's generator to close in the worker")
    wait_until(lambda: by_device(sup)["cpu:1"]["in_flight"] == 0, T, "the stopped stream to end in the worker")
    assert seen == ["cancelled"]
    assert sup.submit("pid", mode="diag").result(T) == pid


# ------------------------------------------------------------------ shutdown


def test_shutdown_with_drain_finishes_the_work_of_every_device_and_reaps_every_worker(write_config, helper_loaders):
    """Jobs running on each device, more queued for each, and jobs for a
    fourth mode that needs a switch while draining: every one is answered
    once, with its result; every worker (and each one seen in a result) is
    reaped; new work is refused."""
    from protocol import ShuttingDown

    sup = Supervisor(write_config(three({m: mode(m) for m in "abcd"}))).start()
    try:
        one_mode_each(sup)
        futures = [(m, sup.submit("work", 0.1, mode=m)) for _ in range(4) for m in "abcd"]
        seen = [outcomes(f) for _, f in futures]
        wait_until(lambda: all(d["in_flight"] for d in by_device(sup).values()), T, "a job on every device")
        pids = worker_pids(sup)
        sup.shutdown(drain=True, timeout=3 * T)
        assert all(f.done() for _, f in futures), "shutdown(drain=True) returned before the work was done"
        results = [(m, f.result(0)) for m, f in futures]
        assert all(r["tag"] == m for m, r in results)
        assert seen == [["ok"]] * len(futures)
        pids |= {r["pid"] for _, r in results}
        assert all_reaped(pids), "a worker outlived the drain"
        assert sup.status()["state"] == "stopped"
        with pytest.raises(ShuttingDown):
            sup.submit("work", 0, mode="a").result(T)
    finally:
        sup.shutdown(drain=False)


def test_shutdown_without_drain_cancels_every_devices_work_once(write_config, helper_loaders):
    """Running jobs on two devices, a switch under way on the third, jobs
    queued behind them: each gets ``JobCancelled`` once (the switch too),
    and every worker is reaped."""
    sup = Supervisor(write_config(three({m: mode(m) for m in "abcd"}, load_timeout=T))).start()
    try:
        sup.switch_mode("a", device="cpu:0").result(T)
        sup.switch_mode("b", device="cpu:1").result(T)
        running = [sup.submit("work", 30, mode=m, timeout=0) for m in "ab"]
        wait_until(lambda: by_device(sup)["cpu:0"]["in_flight"] and by_device(sup)["cpu:1"]["in_flight"], T,
                   "jobs running on cpu:0 and cpu:1")  # fmt: skip
        switch = sup.switch_mode("c", device="cpu:2")
        queued = [sup.submit("work", 0, mode=m) for m in "abcd" * 2]
        every = [*running, switch, *queued]
        seen = [outcomes(f) for f in every]
        pids = worker_pids(sup)
        sup.shutdown(drain=False)
        wait_until(lambda: all(f.done() for f in every), T, "every outcome")
        for f, s in zip(every, seen, strict=True):
            assert len(s) == 1, s
            assert f.cancelled() or isinstance(f.exception(0), JobCancelled), (f, s)
        pids |= worker_pids(sup)
        wait_until(lambda: all_reaped(pids), T, "every worker to be reaped")
    finally:
        sup.shutdown(drain=False)


# ------------------------------------------------------------------ idle unload


def test_idle_unload_stops_each_idle_device_and_the_next_job_reloads_its_mode(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}, idle_unload_s=0.3))
    first = {m: sup.submit("work", 0, mode=m).result(T) for m in "abc"}
    wait_until(lambda: all(d["idle_unloaded"] for d in by_device(sup).values()), T, "every device to unload")
    wait_until(lambda: all_reaped(r["pid"] for r in first.values()), T, "the unloaded workers to be reaped")
    # A reaped worker stays in the status until its last words are in (a
    # few tens of ms after its exit): the status is waited for, not assumed.
    wait_until(lambda: not worker_pids(sup), T, "the status to list no worker")
    unloaded = {d["idle_unloaded"]: n for n, d in by_device(sup).items()}
    assert sorted(unloaded) == ["a", "b", "c"]
    again = {m: sup.submit("work", 0, mode=m) for m in "abc"}
    seen = [outcomes(f) for f in again.values()]
    for m, f in again.items():
        assert f.result(T)["tag"] == m
    assert seen == [["ok"]] * 3
    assert sum(d["restarts"] for d in by_device(sup).values()) == 0, "an idle unload is not a death"


def test_an_idle_device_unloads_while_another_devices_mode_has_a_backlog(supervisor_from):
    """``idle_unload_s`` frees an idle device's memory. cpu:0 holds ``a``
    and has nothing to do; ``diag`` (one replica, on cpu:1) runs a stream
    with jobs queued behind it that cpu:0 may not take. cpu:0's worker is
    idle all along: it is unloaded, not kept until cpu:1's queue is empty."""
    sup: Supervisor = supervisor_from(three({"a": mode("a", idle_unload_s=0.3), "diag": DIAG}))
    sup.switch_mode("diag", device="cpu:1").result(T)
    stream = sup.submit("count", {"n": 100000, "delay": 0.01}, stream=True, mode="diag")
    backlog = [sup.submit("echo", i, mode="diag") for i in range(3)]
    assert next(stream) == 0
    assert sup.submit("work", 0, mode="a").result(T)["tag"] == "a"  # cpu:0 is idle from here on
    try:
        wait_until(lambda: by_device(sup)["cpu:0"]["idle_unloaded"] == "a", 10, "cpu:0, idle, to be unloaded")
    finally:
        assert stream.cancel() is True
        assert [f.result(T) for f in backlog] == [0, 1, 2]


# ------------------------------------------------------------------ batches


def test_batches_form_per_device_and_every_job_gets_its_own_item(supervisor_from):
    """``diag`` may hold two devices. While one of them runs a stream, two
    callers' bursts of ``batch_echo`` run as batches on the other; then, with
    both free, another burst: each job gets its own payload back once, no
    batch is larger than ``max_batch``, and the status counts the batches on
    the devices that ran them."""
    sup: Supervisor = supervisor_from(three({"diag": {"loader": DIAG, "replicas": 2}, "a": mode("a")}))
    sup.switch_mode("diag", device="cpu:0").result(T)
    sup.switch_mode("diag", device="cpu:2").result(T)
    stream = sup.submit("count", {"n": 100000, "delay": 0.01}, stream=True, mode="diag")
    assert next(stream) == 0
    streaming = next(n for n, d in by_device(sup).items() if d["in_flight"])
    other = "cpu:2" if streaming == "cpu:0" else "cpu:0"
    futures: list[list[Future]] = [[], [], []]

    def caller(n: int) -> None:
        futures[n] = [sup.submit("batch_echo", f"{n}-{i}", mode="diag") for i in range(20)]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    seen = [outcomes(f) for fs in futures for f in fs]
    for n in range(2):
        got = [f.result(T) for f in futures[n]]
        assert [g["payload"] for g in got] == [f"{n}-{i}" for i in range(20)]
        assert all(1 <= g["batch"] <= 8 for g in got)
    devices = by_device(sup)
    assert devices[streaming]["batches"]["count"] == 0, "a device running a stream took a batch"
    assert devices[other]["batches"]["count"] > 0 and devices[other]["batches"]["largest"] <= 8
    assert stream.cancel() is True
    wait_until(lambda: all(d["in_flight"] == 0 for d in by_device(sup).values()), T, "the stream to stop")
    caller(2)
    seen += [outcomes(f) for f in futures[2]]
    got = [f.result(T) for f in futures[2]]
    assert [g["payload"] for g in got] == [f"2-{i}" for i in range(20)] and all(g["batch"] <= 8 for g in got)
    assert seen == [["ok"]] * 60
    devices = by_device(sup)
    assert devices["cpu:1"]["batches"]["count"] == 0
    assert sum(d["batches"]["jobs"] for d in devices.values()) <= 60
    assert max(d["batches"]["largest"] for d in devices.values()) <= 8


# ------------------------------------------------------------------ faults on one device


def test_a_job_with_a_retry_killed_on_the_second_device_runs_again_once(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    one_mode_each(sup)
    victim = by_device(sup)["cpu:1"]["worker_pid"]
    retried = sup.submit("work", 1.0, mode="b", retries=1)
    plain = sup.submit("work", 1.0, mode="b")  # queued behind it: it never ran, so it is not failed
    others = [sup.submit("work", 0.5, mode=m) for m in "ac"]
    seen = [outcomes(f) for f in (retried, plain, *others)]
    wait_until(lambda: by_device(sup)["cpu:1"]["in_flight"] == 1, T, "the retried job to run on cpu:1")
    os.kill(victim, signal.SIGKILL)
    got = retried.result(T)
    assert got["tag"] == "b" and got["pid"] != victim
    assert plain.result(T)["tag"] == "b"
    assert [f.result(T)["tag"] for f in others] == ["a", "c"]
    assert seen == [["ok"]] * 4
    devices = by_device(sup)
    assert devices["cpu:1"]["restarts"] == 1 and devices["cpu:0"]["restarts"] == devices["cpu:2"]["restarts"] == 0


def test_a_job_without_retries_killed_on_the_third_device_fails_once(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    one_mode_each(sup)
    victim = by_device(sup)["cpu:2"]["worker_pid"]
    doomed = sup.submit("work", 30, mode="c", timeout=0)
    seen = outcomes(doomed)
    wait_until(lambda: by_device(sup)["cpu:2"]["in_flight"] == 1, T, "the job to run on cpu:2")
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        doomed.result(T)
    assert sup.submit("work", 0, mode="c").result(T)["tag"] == "c"
    assert len(seen) == 1


def test_an_oom_on_one_device_recycles_its_worker_only(supervisor_from):
    sup: Supervisor = supervisor_from(three({"diag": DIAG, "a": mode("a"), "b": mode("b")}))
    sup.switch_mode("a", device="cpu:0").result(T)
    sup.switch_mode("b", device="cpu:2").result(T)
    pid = sup.switch_mode("diag", device="cpu:1").result(T)["pid"]
    others = {n: by_device(sup)[n]["worker_pid"] for n in ("cpu:0", "cpu:2")}
    oom = sup.submit("oom", mode="diag")
    behind = sup.submit("echo", "behind", mode="diag")
    seen = [outcomes(oom), outcomes(behind)]
    with pytest.raises(OutOfMemory):
        oom.result(T)
    assert behind.result(T) == "behind"
    wait_until(lambda: pid_gone(pid), T, "the worker that ran out of memory to be recycled")
    assert sup.submit("pid", mode="diag").result(T) != pid
    devices = by_device(sup)
    assert devices["cpu:1"]["oom_recycles"] == 1 and devices["cpu:1"]["restarts"] == 0
    assert {n: devices[n]["worker_pid"] for n in others} == others
    assert devices["cpu:0"]["oom_recycles"] == devices["cpu:2"]["oom_recycles"] == 0
    assert [len(s) for s in seen] == [1, 1]


def test_a_job_past_its_timeout_on_the_second_device_fails_alone(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    one_mode_each(sup)
    before = {n: d["worker_pid"] for n, d in by_device(sup).items()}
    late = sup.submit("work", 30, mode="b", timeout=0.5)
    long = [sup.submit("work", 1.0, mode=m, timeout=T) for m in "ac"]
    seen = [outcomes(f) for f in (late, *long)]
    with pytest.raises(JobTimeout):
        late.result(T)
    assert [f.result(T)["tag"] for f in long] == ["a", "c"]
    after = by_device(sup)
    assert after["cpu:0"]["worker_pid"] == before["cpu:0"] and after["cpu:2"]["worker_pid"] == before["cpu:2"]
    assert sup.submit("work", 0, mode="b").result(T)["pid"] != before["cpu:1"]
    assert seen == [[seen[0][0]], ["ok"], ["ok"]] and isinstance(seen[0][0], JobTimeout)


# ------------------------------------------------------------------ a mode that fails to load


def test_a_mode_that_fails_to_load_on_one_device_fails_its_jobs_once_and_the_others_run_on(supervisor_from, tmp_path):
    """While ``flag`` exists, ``a`` cannot load: the device that tries it
    fails the ``a`` jobs waiting (each once, ``ModeLoadError``); the other
    devices' running jobs and workers never notice; once it can load, the
    next ``a`` job runs."""
    flag = tmp_path / "no-a"
    modes = {"a": {"loader": f"{HERE}:stamped", "args": {"tag": "a", "flag": str(flag)}}, "b": mode("b"),
             "c": mode("c")}  # fmt: skip
    sup: Supervisor = supervisor_from(three(modes))
    sup.switch_mode("b", device="cpu:0").result(T)
    sup.switch_mode("c", device="cpu:1").result(T)
    before = {n: by_device(sup)[n]["worker_pid"] for n in ("cpu:0", "cpu:1")}
    long = [sup.submit("work", 1.0, mode=m) for m in "bc"]
    flag.touch()
    doomed = [sup.submit("work", 0, mode="a") for _ in range(3)]
    seen = [outcomes(f) for f in (*long, *doomed)]
    for f in doomed:
        with pytest.raises(ModeLoadError, match="cannot load while"):
            f.result(T)
    assert [f.result(T)["tag"] for f in long] == ["b", "c"]
    flag.unlink()
    assert sup.submit("work", 0, mode="a").result(T)["tag"] == "a"
    devices = by_device(sup)
    assert {n: devices[n]["worker_pid"] for n in before} == before
    assert all(len(s) == 1 for s in seen) and sup.status()["state"] == "running"


def test_a_device_failed_by_a_mode_that_cannot_load_there_lets_the_mode_move_on(supervisor_from, tmp_path):
    """``max_restarts = 0``: the failed load spends cpu:2's budget; the
    supervisor runs on, and the next ``a`` job loads on another device."""
    flag = tmp_path / "no-a"
    modes = {"a": {"loader": f"{HERE}:stamped", "args": {"tag": "a", "flag": str(flag)}}, "b": mode("b")}
    sup: Supervisor = supervisor_from(three(modes, max_restarts=0))
    flag.touch()
    with pytest.raises(ModeLoadError):
        sup.switch_mode("a", device="cpu:2").result(T)
    wait_until(lambda: by_device(sup)["cpu:2"]["failed_reason"], T, "cpu:2 to be failed")
    flag.unlink()
    assert sup.status()["state"] == "running"
    got = sup.submit("work", 0, mode="a").result(T)
    assert got["tag"] == "a" and got["pid"] in (
        by_device(sup)["cpu:0"]["worker_pid"],
        by_device(sup)["cpu:1"]["worker_pid"],
    )
    assert sup.submit("work", 0, mode="b").result(T)["tag"] == "b"


# ------------------------------------------------------------------ window and replicas under load


def concurrency(spans: list[tuple[float, float]]) -> int:
    """The most spans that overlap at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def run_callers(sup: Supervisor, plans: list[list[tuple[str, float]]]) -> list[list[tuple[str, dict]]]:
    sent: list[list[tuple[str, Future]]] = [[] for _ in plans]

    def caller(n: int) -> None:
        sent[n] = [(m, sup.submit("work", seconds, mode=m)) for m, seconds in plans[n]]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    seen = [outcomes(f) for rows in sent for _, f in rows]
    results = [[(m, f.result(3 * T)) for m, f in rows] for rows in sent]
    assert all(s == ["ok"] for s in seen), "every job one outcome"
    return results


@pytest.mark.parametrize("window", [1, 4])
def test_the_replicas_limit_holds_under_sustained_load(supervisor_from, window):
    """Four callers, a mode that may hold two devices and three of one,
    ``window`` 1 and 4: sampled all along, no mode is ever loaded or being
    loaded on more devices than its ``replicas``; by the jobs' own instants,
    no more of a mode's jobs ever run at once than its ``replicas``; each
    caller's jobs of a mode run in its order where the mode has one replica."""
    replicas = {"busy": 2, "x": 1, "y": 1, "z": 1}
    modes = {m: mode(m, replicas=r) for m, r in replicas.items()}
    sup: Supervisor = supervisor_from(three(modes, max_wait_s=0.1, window=window))
    rng = random.Random(15 + window)
    plans = [[(rng.choice(["busy", "busy", "x", "y", "z"]), rng.choice([0, 0.01, 0.03])) for _ in range(40)]
             for _ in range(4)]  # fmt: skip
    too_many: list = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            devices = sup.status()["devices"]
            for m, r in replicas.items():
                holding = [d["name"] for d in devices if m in (d["mode"], d["switching_to"])]
                if len(holding) > r:
                    too_many.append((m, holding))
            time.sleep(0.002)

    watcher = threading.Thread(target=sampler)
    watcher.start()
    try:
        results = run_callers(sup, plans)
    finally:
        stop.set()
        watcher.join(T)
    assert not too_many, too_many[:5]
    jobs = [(m, r) for rows in results for m, r in rows]
    assert all(r["tag"] == m for m, r in jobs), "a job ran in the wrong mode"
    for m, r in replicas.items():
        spans = [(j["start"], j["end"]) for mm, j in jobs if mm == m]
        assert concurrency(spans) <= r, f"{m}: more jobs at once than its {r} replicas"
    for rows in results:
        for m in ("x", "y", "z"):
            starts = [j["start"] for mm, j in rows if mm == m]
            assert starts == sorted(starts), f"a caller's jobs of {m} ran out of its order"
    devices = by_device(sup)
    assert sum(d["jobs_done"] for d in devices.values()) == 160 == sup.status()["jobs_done"]


def test_a_second_replica_that_fails_to_load_leaves_the_jobs_the_first_can_run(supervisor_from, tmp_path):
    """``m`` may hold two devices and serves on cpu:0. A backlog makes a
    second device load it, which fails there (the flag: that device cannot
    hold it). The jobs waiting for ``m`` are not that load's: cpu:0 serves
    them. Failing them with ModeLoadError while a device runs ``m`` fine
    would fail work that never needed the broken load."""
    flag = tmp_path / "no-m"
    sup: Supervisor = supervisor_from(three({"m": {"loader": f"{HERE}:stamped", "replicas": 2,
                                                   "args": {"tag": "m", "flag": str(flag)}}}))  # fmt: skip
    served = sup.switch_mode("m", device="cpu:0").result(T)
    flag.touch()
    backlog = [sup.submit("work", 0.2, mode="m") for _ in range(8)]
    seen = [outcomes(f) for f in backlog]
    wait_until(lambda: all(f.done() for f in backlog), 3 * T, "every job of the backlog")
    failed = [f.exception(0) for f in backlog if f.exception(0) is not None]
    assert not failed, f"{len(failed)} of 8 jobs failed while cpu:0 served m: {failed[0]!r}"
    assert all(f.result(0)["pid"] == served["pid"] for f in backlog)
    assert all(len(s) == 1 for s in seen)


def test_a_job_retried_after_a_kill_runs_before_the_switch_queued_after_it(supervisor_from):
    """``a`` runs only on cpu:0. A job with a retry runs there; a switch of
    cpu:0 to ``b`` is queued after it; the worker is killed. The job was
    submitted before the switch, so its second run comes before the switch
    too (in ``a``, on the same device), not after it."""
    sup: Supervisor = supervisor_from(three({"a": mode("a", devices=["cpu:0"]), "b": mode("b")}))
    victim = sup.switch_mode("a", device="cpu:0").result(T)["pid"]
    job = sup.submit("work", 1.0, mode="a", retries=1)
    wait_until(lambda: by_device(sup)["cpu:0"]["in_flight"] == 1, T, "the job to run on cpu:0")
    order: list[str] = []
    job.add_done_callback(lambda f: order.append("job"))
    switch = sup.switch_mode("b", device="cpu:0")
    switch.add_done_callback(lambda f: order.append("switch"))
    wait_until(lambda: sup.status()["queued"] == 1, T, "the switch to wait behind the job")
    os.kill(victim, signal.SIGKILL)
    got = job.result(T)
    assert switch.result(T)["status"] == "loaded"
    assert got["tag"] == "a" and got["pid"] != victim
    assert order == ["job", "switch"], "the retried job ran after a switch queued after it"


# ------------------------------------------------------------------ more of restart(), drains and hangs


def test_restart_of_a_busy_device_waits_for_its_job_and_the_others_serve_after(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}))
    one_mode_each(sup)
    old = by_device(sup)["cpu:1"]["worker_pid"]
    running = sup.submit("work", 0.8, mode="b")
    wait_until(lambda: by_device(sup)["cpu:1"]["in_flight"] == 1, T, "the b job to run on cpu:1")
    restart = sup.restart(device="cpu:1")
    after = [sup.submit("work", 0, mode=m) for m in "abc"]
    ran, restarted = running.result(T), restart.result(T)
    got = [f.result(T) for f in after]
    assert ran["pid"] == old and restarted["status"] == "restarted" and restarted["mode"] == "b"
    assert restarted["pid"] != old and got[1]["pid"] == restarted["pid"]
    assert all(g["start"] > ran["end"] for g in got), "a job behind the restart ran before it"
    assert [g["tag"] for g in got] == ["a", "b", "c"]


def test_restart_of_no_device_brings_back_the_failed_device_first(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}, max_restarts=0))
    one_mode_each(sup)
    os.kill(by_device(sup)["cpu:1"]["worker_pid"], signal.SIGKILL)
    wait_until(lambda: by_device(sup)["cpu:1"]["failed_reason"], T, "cpu:1 to be failed")
    others = {n: by_device(sup)[n]["worker_pid"] for n in ("cpu:0", "cpu:2")}
    back = sup.restart().result(T)
    devices = by_device(sup)
    assert back["status"] == "restarted" and back["mode"] == "b" and devices["cpu:1"]["failed_reason"] is None
    assert devices["cpu:1"]["worker_pid"] == back["pid"]
    assert {n: devices[n]["worker_pid"] for n in others} == others


def test_a_drain_that_runs_out_of_time_cancels_each_devices_jobs_once(write_config, helper_loaders):
    sup = Supervisor(write_config(three({m: mode(m) for m in "abc"}))).start()
    try:
        one_mode_each(sup)
        pids = worker_pids(sup)
        long = [sup.submit("work", 30, mode=m, timeout=0) for m in "abc"]
        queued = [sup.submit("work", 0, mode=m) for m in "abc"]
        seen = [outcomes(f) for f in (*long, *queued)]
        wait_until(lambda: all(d["in_flight"] for d in by_device(sup).values()), T, "a job on every device")
        sup.shutdown(drain=True, timeout=0.5)
        for f in long:
            with pytest.raises(JobCancelled):
                f.result(0)
        for f in queued:
            assert f.cancelled() or isinstance(f.exception(0), JobCancelled)
        assert all(len(s) == 1 for s in seen)
        wait_until(lambda: all_reaped(pids), T, "every worker to be reaped")
    finally:
        sup.shutdown(drain=False)


def test_a_hung_worker_on_one_device_is_killed_and_the_others_run_on(supervisor_from):
    sup: Supervisor = supervisor_from(three({m: mode(m) for m in "abc"}, heartbeat_interval=0.2,
                                            heartbeat_timeout=3.0))  # fmt: skip
    one_mode_each(sup)
    others = {n: by_device(sup)[n]["worker_pid"] for n in ("cpu:0", "cpu:1")}
    hung = by_device(sup)["cpu:2"]["worker_pid"]
    stuck = sup.submit("work", 5, mode="c")
    wait_until(lambda: by_device(sup)["cpu:2"]["in_flight"] == 1, T, "the job to run on cpu:2")
    os.kill(hung, signal.SIGSTOP)
    busy = [sup.submit("work", 0.3, mode=m) for m in "abab"]
    with pytest.raises(WorkerCrashed, match="hung"):
        stuck.result(T)
    assert [f.result(T)["tag"] for f in busy] == list("abab")
    wait_until(lambda: pid_gone(hung), T, "the hung worker to be reaped")
    assert sup.submit("work", 0, mode="c").result(T)["tag"] == "c"
    devices = by_device(sup)
    assert {n: devices[n]["worker_pid"] for n in others} == others


# ------------------------------------------------------------------ spares and metrics


def test_warm_spares_on_every_device_serve_switches_and_are_all_reaped(write_config, helper_loaders):
    """``warm_standby`` with a light ``preload``: each device keeps a spare;
    switches take them; jobs of four modes from three callers each end
    once in their mode; after the shutdown no worker and no spare is left."""
    modes = {m: mode(m, preload=["json"]) for m in "abcd"}
    sup = Supervisor(write_config(config_text(modes, supervisor={"devices": THREE, "warm_standby": True,
                                                                 "max_wait_s": 0.1}))).start()  # fmt: skip
    try:
        wait_until(lambda: all(d["standby_ready"] for d in by_device(sup).values()), T, "a ready spare per device")
        spares = {d["standby_pid"] for d in by_device(sup).values()}
        assert len(spares) == 3
        plans = [[("abcd"[(i * (n + 1)) % 4], 0.01) for i in range(16)] for n in range(3)]
        results = run_callers(sup, plans)
        assert all(r["tag"] == m for rows in results for m, r in rows)
        seen = {r["pid"] for rows in results for _, r in rows}
        assert seen & spares, "no switch used a spare"
        pids = seen | spares | worker_pids(sup) | {d["standby_pid"] for d in by_device(sup).values()} - {None}
        sup.shutdown(drain=True, timeout=T)
        wait_until(lambda: all_reaped(pids), T, "every worker and spare to be reaped")
    finally:
        sup.shutdown(drain=False)


def test_the_metrics_agree_with_the_jobs_and_the_devices(supervisor_from, tmp_path):
    """After mixed work on three devices (results, a failure, a cancelled
    stream, a crash), the job counters add up to the jobs sent, each once;
    ``gpuvisor_mode_loaded`` and ``gpuvisor_in_flight`` match the status per
    device; restarts count on the device that had them."""
    from prometheus_client.parser import text_string_to_metric_families

    sup: Supervisor = supervisor_from(three({"diag": DIAG, "a": mode("a"), "b": mode("b")}))
    sup.switch_mode("diag", device="cpu:2").result(T)
    futures = [sup.submit("work", 0, mode=m) for m in "abab"]
    futures.append(sup.submit("fail", mode="diag"))
    stream = sup.submit("count", {"n": 100000, "delay": 0.01}, stream=True, mode="diag")
    next(stream)
    assert stream.cancel() is True
    crash = sup.submit("crash", {"how": "kill"}, mode="diag")
    every = [*futures, stream.future, crash]
    wait_until(lambda: all(f.done() for f in every), T, "every outcome")
    wait_until(lambda: all(d["in_flight"] == 0 for d in by_device(sup).values()), T, "the stopped stream to end")
    samples = [s for f in text_string_to_metric_families(sup.metrics()) for s in f.samples]
    jobs = {(s.labels["mode"], s.labels["task"], s.labels["outcome"]): s.value for s in samples
            if s.name == "gpuvisor_jobs_total"}  # fmt: skip
    assert sum(jobs.values()) == len(every), jobs
    assert jobs[("a", "work", "ok")] == jobs[("b", "work", "ok")] == 2
    assert jobs[("diag", "count", "cancelled")] == 1 and jobs[("diag", "crash", "worker_crashed")] == 1, jobs
    status = by_device(sup)
    loaded = {s.labels["device"]: s.labels["mode"] for s in samples if s.name == "gpuvisor_mode_loaded"}
    assert loaded == {n: d["mode"] for n, d in status.items() if d["mode"]}
    restarts = {s.labels["device"]: s.value for s in samples if s.name == "gpuvisor_worker_restarts_total"}
    assert restarts == {"cpu:0": 0, "cpu:1": 0, "cpu:2": 1}, restarts
    in_flight = {s.labels["device"]: s.value for s in samples if s.name == "gpuvisor_in_flight"}
    assert in_flight == {"cpu:0": 0, "cpu:1": 0, "cpu:2": 0}


# ------------------------------------------------------------------ reload


def test_a_reload_that_moves_a_held_mode_to_another_device_still_runs_its_jobs(supervisor_from, write_config):
    """``a`` is loaded on cpu:0; a reload pins it to cpu:1. cpu:0 may no
    longer run it, so its jobs must go to cpu:1, not wait for ever: the
    device that may not run ``a`` must not count as one of its replicas."""
    sup: Supervisor = supervisor_from(three({"a": mode("a"), "b": mode("b")}))
    sup.switch_mode("a", device="cpu:0").result(T)
    sup.reload(write_config(three({"a": mode("a", devices=["cpu:1"]), "b": mode("b")}))).result(T)
    job = sup.submit("work", 0, mode="a")
    try:
        got = job.result(10)
    finally:
        if not job.done():
            sup.shutdown(drain=False)
    assert got["tag"] == "a" and got["pid"] == by_device(sup)["cpu:1"]["worker_pid"]


def test_two_streams_on_two_devices_a_cancel_stops_only_its_own(supervisor_from, tmp_path):
    """``diag`` holds cpu:1 and cpu:2 (``replicas = 2``): one stream runs on
    each, one read through ``on_chunk`` and a ``JobFuture``. Cancelling the
    one on cpu:2 (``JobFuture.cancel()``) stops it alone; the other keeps
    streaming until it is cancelled in turn."""
    sup: Supervisor = supervisor_from(three({"diag": {**DIAG_HOOKS, "replicas": 2}, "a": mode("a")}))
    sup.switch_mode("a", device="cpu:0").result(T)
    sup.switch_mode("diag", device="cpu:1").result(T)
    sup.switch_mode("diag", device="cpu:2").result(T)
    first, second = tmp_path / "1", tmp_path / "2"
    stream = sup.submit("count", {"n": 100000, "delay": 0.01, "record": str(first)}, stream=True, mode="diag")
    assert next(stream) == 0
    chunks: list = []
    future = sup.submit("count", {"n": 100000, "delay": 0.01, "record": str(second)}, mode="diag",
                        on_chunk=chunks.append)  # fmt: skip
    seen = [outcomes(stream.future), outcomes(future)]
    wait_until(lambda: len(chunks) >= 2 and all(d["in_flight"] for n, d in by_device(sup).items() if n != "cpu:0"),
               T, "a stream on cpu:1 and one on cpu:2")  # fmt: skip
    where = {n: d["worker_pid"] for n, d in by_device(sup).items()}
    assert future.cancel() is True and future.cancelled()
    wait_until(lambda: "closed" in produced(second), T, "the cancelled stream to stop in its worker")
    going = len(produced(first))
    wait_until(lambda: len(produced(first)) > going + 3, T, "the other stream to go on")
    assert "closed" not in produced(first)
    assert stream.cancel() is True
    wait_until(lambda: "closed" in produced(first), T, "the first stream to stop")
    assert seen == [["cancelled"], ["cancelled"]]
    assert {n: d["worker_pid"] for n, d in by_device(sup).items()} == where
