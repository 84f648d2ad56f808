"""Several devices under one supervisor, checked with CPU device slots
(``devices = ["cpu", "cpu", "cpu"]``): each slot has a worker of its own,
so the placement rules hold here as they do across GPUs. Every mode's
``work`` task answers with the mode that ran it (its loader's tag), so a
job run on a device in the wrong mode cannot pass unseen."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocol import WorkerCrashed
from supervisor import Supervisor
from supervisor.config import ConfigError, parse
from tests.helpers import T, wait_until
from tests.helpers.config import config_text
from tests.helpers.daemon import GPUVISOR, RunningDaemon
from tests.test_http import curl, http_config, http_socket

THREE = ["cpu", "cpu", "cpu"]
NAMES = ["cpu:0", "cpu:1", "cpu:2"]


def mode(tag: str, **more) -> dict:
    return {"loader": "tests.helpers.loaders:placed", "args": {"tag": tag}, **more}


def four_modes(**settings) -> str:
    return config_text({m: mode(m) for m in "abcd"},
                       supervisor={"devices": THREE, "warm_standby": False, **settings})  # fmt: skip


def switches(sup) -> float:
    total = 0.0
    for family in text_string_to_metric_families(sup.metrics()):
        for s in family.samples:
            if s.name == "gpuvisor_switches_total" and s.labels["outcome"] == "loaded":
                total += s.value
    return total


def by_device(sup) -> dict[str, dict]:
    return {d["name"]: d for d in sup.status()["devices"]}


@pytest.mark.process
def test_mixed_traffic_from_several_callers_runs_each_job_in_its_mode_once(supervisor_from):
    """4 callers, 4 modes, 3 devices: every job ends once, in a worker of its
    own mode; the devices share the work; switches stay near what grouping
    the jobs by hand would need, far from one per job."""
    sup: Supervisor = supervisor_from(four_modes(max_wait_s=0.5))
    assert sup.status()["devices"] and [d["name"] for d in sup.status()["devices"]] == NAMES
    rng = random.Random(15)
    plans = [[rng.choice("abcd") for _ in range(30)] for _ in range(4)]
    results: list[list] = [[] for _ in plans]

    def caller(n: int) -> None:
        futures = [(m, sup.submit("work", 0.01, mode=m)) for m in plans[n]]
        results[n] = [(m, f.result(3 * T)) for m, f in futures]

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(6 * T)
    assert all(len(r) == 30 for r in results), "every job has its outcome"
    for answers in results:
        for wanted, got in answers:
            assert got["tag"] == wanted, f"a job for {wanted} ran in a worker of {got['tag']}"
            assert got["visible"] == "", "a CPU slot's worker sees no GPU"
    devices = by_device(sup)
    assert sum(d["jobs_done"] for d in devices.values()) == 120 == sup.status()["jobs_done"]
    assert all(d["jobs_done"] > 0 for d in devices.values()), f"the work is spread: {devices}"
    # By hand: each of the 4 modes loaded once, 4 loads. One switch per job would be about 90.
    made = switches(sup)
    assert 4 <= made <= 16, f"{made} switches for 120 jobs of 4 modes on 3 devices"


@pytest.mark.process
def test_a_mode_is_held_by_at_most_replicas_devices_and_only_those_it_names(supervisor_from):
    sup: Supervisor = supervisor_from(config_text(
        {"busy": mode("busy", replicas=3), "rare": mode("rare", devices=["cpu:2"]), "solo": mode("solo")},
        supervisor={"devices": THREE, "warm_standby": False},
    ))  # fmt: skip
    # Nine slow jobs for a mode that may hold every device run on three workers at once.
    busy = [sup.submit("work", 0.4, mode="busy") for _ in range(9)]
    wait_until(lambda: sum(d["in_flight"] for d in by_device(sup).values()) == 3, T, "three busy jobs at once")
    pids = {f.result(T)["pid"] for f in busy}
    assert len(pids) == 3, pids
    # A mode of one replica stays on one device, however many of its jobs wait.
    solo = [sup.submit("work", 0.1, mode="solo") for _ in range(6)]
    assert len({f.result(T)["pid"] for f in solo}) == 1
    holding = [d["name"] for d in by_device(sup).values() if d["mode"] == "solo"]
    assert len(holding) == 1
    # A mode that names its device runs there and nowhere else.
    for _ in range(3):
        got = sup.submit("work", 0, mode="rare").result(T)
        assert got["pid"] == by_device(sup)["cpu:2"]["worker_pid"]


@pytest.mark.process
def test_a_kill_on_one_device_leaves_the_others_jobs_alone(supervisor_from):
    sup: Supervisor = supervisor_from(config_text({m: mode(m) for m in "abc"},
                                                  supervisor={"devices": THREE, "warm_standby": False}))  # fmt: skip
    for m in "abc":
        sup.switch_mode(m).result(T)
    devices = by_device(sup)
    assert sorted(d["mode"] for d in devices.values()) == ["a", "b", "c"]
    long = {m: sup.submit("work", 1.5, mode=m) for m in "abc"}
    wait_until(lambda: all(d["in_flight"] == 1 for d in by_device(sup).values()), T, "a job on every device")
    victim = next(d for d in by_device(sup).values() if d["mode"] == "b")
    others = {d["name"]: d["worker_pid"] for d in by_device(sup).values() if d["mode"] != "b"}
    os.kill(victim["worker_pid"], signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        long["b"].result(T)
    assert long["a"].result(T)["tag"] == "a" and long["c"].result(T)["tag"] == "c"
    after = by_device(sup)
    assert {name: after[name]["worker_pid"] for name in others} == others, "the other workers never noticed"
    assert after[victim["name"]]["restarts"] == 1 and all(after[n]["restarts"] == 0 for n in others)
    # The mode comes back on its device for the next job.
    assert sup.submit("work", 0, mode="b").result(T)["tag"] == "b"
    assert sup.status()["state"] == "running"


@pytest.mark.process
def test_switch_mode_names_its_device_or_placement_chooses(supervisor_from):
    sup: Supervisor = supervisor_from(config_text(
        {"a": mode("a"), "b": mode("b"), "pinned": mode("pinned", devices=["cpu:1"])},
        supervisor={"devices": THREE, "warm_standby": False},
    ))  # fmt: skip
    first = sup.switch_mode("a").result(T)
    holder = next(name for name, d in by_device(sup).items() if d["mode"] == "a")
    assert first["status"] == "loaded"
    # Already held somewhere: a no-op, on the device that holds it.
    again = sup.switch_mode("a").result(T)
    assert again["status"] == "already_loaded" and again["pid"] == by_device(sup)[holder]["worker_pid"]
    other = next(n for n in NAMES if n != holder)
    assert sup.switch_mode("b", device=other).result(T)["status"] == "loaded"
    assert by_device(sup)[other]["mode"] == "b" and by_device(sup)[holder]["mode"] == "a", "one device changed"
    assert sup.switch_mode("pinned").result(T)["status"] == "loaded"
    assert by_device(sup)["cpu:1"]["mode"] == "pinned"
    with pytest.raises(ValueError, match="unknown device 'cuda:7'"):
        sup.switch_mode("a", device="cuda:7").result(0)  # failed at once, as through the daemon
    with pytest.raises(ValueError, match="may not run on 'cpu:0'"):
        sup.switch_mode("pinned", device="cpu:0").result(0)
    restarted = sup.restart(device="cpu:1").result(T)
    assert restarted["status"] == "restarted" and restarted["mode"] == "pinned"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "mode_keys", "words"),
    [
        ({"devices": ["cuda:0", "cuda:0"]}, {}, "each GPU at most once"),
        ({"devices": []}, {}, "a list of devices"),
        ({"devices": ["cpu"], "device": "cpu"}, {}, "not both"),
        ({"devices": THREE}, {"devices": ["cpu:3"]}, "'cpu:3' is not one of [supervisor] devices"),
        ({"devices": THREE}, {"replicas": 0}, "replicas"),
        ({}, {"devices": ["cpu"]}, "[supervisor] devices is not set"),
    ],
)
def test_device_settings_with_mistakes_say_which_line_and_key(settings, mode_keys, words):
    text = config_text({"a": mode("a", **mode_keys)}, supervisor=settings or None)
    with pytest.raises(ConfigError) as caught:
        parse(text, "g.toml")
    assert words in str(caught.value) and "g.toml:" in str(caught.value), caught.value


@pytest.mark.daemon
@pytest.mark.slow
def test_a_daemon_shows_every_device_through_its_doors():
    """``gpuvisor switch --device``, ``gpuvisor status``, ``/v1/models`` and
    ``/metrics`` of a real ``gpuvisor serve`` over two CPU devices."""
    text = http_config({"a": mode("a"), "b": mode("b")}, {"model-a": {"mode": "a", "completions": "work"}},
                       supervisor={"devices": ["cpu", "cpu"], "warm_standby": False})  # fmt: skip
    d = RunningDaemon(config_text=text)
    try:
        done = subprocess.run([GPUVISOR, "--endpoint", d.endpoint, "--json", "switch", "b", "--device", "cpu:1"],
                              capture_output=True, text=True, timeout=T)  # fmt: skip
        assert done.returncode == 0, done.stderr
        with d.client() as c:
            assert c.submit("work", 0, mode="a").result(T)["tag"] == "a"
            status = c.status()
            assert [(x["name"], x["mode"]) for x in status["devices"]] == [("cpu:0", "a"), ("cpu:1", "b")]
            assert all(x["worker_pid"] for x in status["devices"])
            with pytest.raises(Exception, match="unknown device"):
                c.switch_mode("a", device="cpu:9").result(T)
            models = c.modes()
            assert models["a"]["devices"] == ["cpu:0"] and models["b"]["devices"] == ["cpu:1"]
        code, body = curl("http://gpuvisor/v1/models", unix=http_socket(d))
        assert code == 200 and body["data"][0]["devices"] == ["cpu:0"], body
        code, body = curl("http://gpuvisor/metrics", unix=http_socket(d))
        loaded = {(s.labels["device"], s.labels["mode"]) for f in text_string_to_metric_families(body)
                  for s in f.samples if s.name == "gpuvisor_mode_loaded"}  # fmt: skip
        assert loaded == {("cpu:0", "a"), ("cpu:1", "b")}
    finally:
        d.close()


@pytest.mark.process
def test_a_device_whose_budget_is_spent_fails_alone_and_its_mode_moves_on(supervisor_from):
    """``max_restarts = 0``: the first death fails that device. The mode's
    jobs go to another device; the supervisor is not failed while one is
    left; ``restart(device=)`` brings the failed one back."""
    sup: Supervisor = supervisor_from(config_text({"a": mode("a")}, supervisor={
        "devices": ["cpu", "cpu"], "warm_standby": False, "max_restarts": 0}))  # fmt: skip
    first = sup.submit("work", 0, mode="a").result(T)
    holder = next(d for d in sup.status()["devices"] if d["worker_pid"] == first["pid"])
    running = sup.submit("work", 30, mode="a", timeout=0)
    wait_until(lambda: by_device(sup)[holder["name"]]["in_flight"] == 1, T, "the long job to run")
    os.kill(first["pid"], signal.SIGKILL)
    with pytest.raises(WorkerCrashed):
        running.result(T)
    wait_until(lambda: by_device(sup)[holder["name"]]["failed_reason"], T, "the device to fail")
    assert sup.status()["state"] == "running", "one device is left"
    other = next(n for n in ("cpu:0", "cpu:1") if n != holder["name"])
    moved = sup.submit("work", 0, mode="a").result(T)
    assert moved["tag"] == "a" and moved["pid"] == by_device(sup)[other]["worker_pid"]
    scraped = {(s.name, s.labels.get("device")): s.value for f in text_string_to_metric_families(sup.metrics())
               for s in f.samples if s.name == "gpuvisor_device_failed"}  # fmt: skip
    assert scraped == {("gpuvisor_device_failed", holder["name"]): 1.0, ("gpuvisor_device_failed", other): 0.0}
    back = sup.restart("a", device=holder["name"]).result(T)
    assert back["status"] == "restarted" and by_device(sup)[holder["name"]]["failed_reason"] is None


@pytest.mark.daemon
@pytest.mark.slow
def test_health_with_several_devices_lists_each_and_serves_while_any_does():
    text = http_config({"a": mode("a"), "b": mode("b")}, {"model-a": {"mode": "a", "completions": "work"}},
                       supervisor={"devices": ["cpu", "cpu"], "warm_standby": False, "default_mode": "a"})  # fmt: skip
    d = RunningDaemon(config_text=text)
    try:
        with d.client() as c:
            wait_until(lambda: any(x["mode"] == "a" for x in c.status()["devices"]), T, "a to load")
            busy = c.submit("work", 1.0, mode="b")
            wait_until(lambda: c.status()["in_flight"] == 1, T, "b's job to run on its device")
            code, body = curl("http://gpuvisor/health", unix=http_socket(d))
            assert code == 200 and body["status"] == "ok" and body["in_flight"] == 1, body
            assert sorted((x["mode"], x["in_flight"]) for x in body["devices"]) == [("a", 0), ("b", 1)], body
            assert busy.result(T)["tag"] == "b"
    finally:
        d.close()
