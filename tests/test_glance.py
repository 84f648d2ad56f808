"""The history the status page and `gpuvisor top` draw, fed by hand: the
switch timeline from the event stream's phases, memory points from status
samples, errors, and bounds that hold whatever comes."""

from __future__ import annotations

import json

import msgpack
import pytest

from supervisor.service.glance import ERRORS_KEPT, SWITCHES_KEPT, Glance
from tests.helpers.fake_world import FakeClock as Clock

pytestmark = pytest.mark.unit


def switch(phase: str, t: float, mode: str = "b", device: str | None = "cpu", **fields):
    return {
        "event": "switch",
        "t": t,
        "phase": phase,
        "mode": mode,
        "device": device,
        "previous": "a",
        "why": "switch",
        "elapsed": fields.pop("elapsed", 0.0),
        **fields,
    }


def status(**device):
    return {"state": "running", "devices": [{"name": "cpu", **device}], "queued": 0, "waiting": {}}


def test_a_switch_is_one_entry_whose_phases_come_from_its_ready_figures():
    glance = Glance(clock=Clock())
    glance.record(switch("queued", 10.0, device=None, ahead=3))
    glance.record(switch("stop", 10.5, elapsed=0.5))
    glance.record(switch("spawn", 10.7, elapsed=0.7))
    assert glance.picture(status())["switches"][0]["outcome"] == "under way"
    assert glance.picture(status())["switches"][0]["phase"] == "spawn"
    glance.record(
        switch(
            "ready",
            11.0,
            elapsed=1.0,
            seconds=1.0,
            stop_seconds=0.2,
            spawn_seconds=0.1,
            load_seconds=0.6,
            warmup_seconds=0.1,
            reclaim_seconds=None,
        )
    )
    [sw] = glance.picture(status())["switches"]
    assert sw["outcome"] == "ready" and sw["seconds"] == 1.0
    assert sw["started"] == 10.0  # from the queued event: the wait in the queue is part of it
    assert sw["phases"] == {"stop": 0.2, "spawn": 0.1, "load": 0.6, "warmup": 0.1}
    assert (sw["mode"], sw["previous"], sw["device"], sw["why"]) == ("b", "a", "cpu", "switch")


def test_a_failed_switch_is_an_error_too_and_the_next_one_is_a_new_entry():
    glance = Glance(clock=Clock())
    glance.record(switch("spawn", 20.0, elapsed=0.0))
    glance.record(switch("failed", 20.4, elapsed=0.4, error="ModeLoadError: boom"))
    glance.record(switch("spawn", 21.0, mode="c"))
    picture = glance.picture(status())
    assert [(s["mode"], s["outcome"]) for s in picture["switches"]] == [("c", "under way"), ("b", "failed")]
    assert picture["switches"][1]["error"] == "ModeLoadError: boom"
    assert picture["switches"][1]["seconds"] == pytest.approx(0.4)
    assert picture["errors"][0]["what"] == "switch to 'b' failed: ModeLoadError: boom"


def test_only_a_worker_that_died_is_an_error():
    glance = Glance(clock=Clock())
    glance.record(
        {"event": "worker_ended", "t": 5.0, "pid": 7, "mode": "a", "device": "cpu", "why": "drained", "expected": True}
    )
    glance.record(
        {
            "event": "worker_ended",
            "t": 6.0,
            "pid": 8,
            "mode": "a",
            "device": "cpu",
            "why": "killed by SIGKILL",
            "expected": False,
        }
    )
    glance.record({"event": "dropped", "count": 3})  # a reader that fell behind: nothing to draw
    errors = glance.picture(status())["errors"]
    assert [e["what"] for e in errors] == ["worker 8 ended: killed by SIGKILL"]


def test_memory_is_a_point_per_sample_and_per_device_with_gaps_kept():
    clock = Clock()
    glance = Glance(clock=clock, sample_every=2.0)
    glance.sample(status(worker_rss_bytes=None))
    clock.now += 2
    glance.sample(status(worker_rss_bytes=100, worker_vram_bytes=50, gpu={"used_bytes": 70, "total_bytes": 80}))
    assert glance.picture(status())["memory"] == {"cpu": [[1000.0, None, None, None], [1002.0, 100, 50, 70]]}


def test_every_ring_stays_bounded():
    clock = Clock()
    glance = Glance(clock=clock, sample_every=2.0)
    for i in range(SWITCHES_KEPT + 15):
        glance.record(switch("failed", float(i), mode=f"m{i}", error="no"))
    for _ in range(1000):
        clock.now += 2
        glance.sample(status(worker_rss_bytes=1))
    picture = glance.picture(status())
    assert len(picture["switches"]) == SWITCHES_KEPT
    assert len(picture["errors"]) == ERRORS_KEPT
    assert len(picture["memory"]["cpu"]) == 301  # ten minutes at one point every 2 s
    assert picture["switches"][0]["mode"] == f"m{SWITCHES_KEPT + 14}"  # newest first


def test_a_device_error_the_events_missed_is_listed_and_the_picture_travels_as_json_and_msgpack():
    glance = Glance(clock=Clock())
    picture = glance.picture({**status(last_error="cannot load 'x'", mode=None), "modes": ["a", "x"]})
    assert picture["errors"] == [{"t": None, "device": "cpu", "mode": None, "what": "cannot load 'x'"}]
    assert picture["modes"] == ["a", "x"]
    assert json.loads(json.dumps(picture)) == picture
    assert msgpack.unpackb(msgpack.packb(picture), strict_map_key=False) == picture


def test_a_switch_under_way_or_failed_keeps_the_phases_seen_so_far():
    glance = Glance(clock=Clock())
    glance.record(switch("stop", 30.0, elapsed=0.0))
    glance.record(switch("spawn", 30.5, elapsed=0.5))
    glance.record(switch("load", 30.7, elapsed=0.7))
    [sw] = glance.picture(status())["switches"]
    assert sw["phases"] == {"stop": 0.5, "spawn": 0.2} and sw["phase"] == "load"
    glance.record(switch("failed", 32.0, elapsed=2.0, error="ModeLoadError: boom"))
    [sw] = glance.picture(status())["switches"]
    assert sw["phases"] == {"stop": 0.5, "spawn": 0.2, "load": 1.3} and sw["failed_in"] == "load"
    assert sw["seconds"] == pytest.approx(2.0)
