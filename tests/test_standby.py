"""The warm standby: a spare worker that has imported what earlier workers
imported, taken into service by the next switch. Real processes throughout;
``tests.helpers.loaders:preloads`` stands in for a torch mode (it imports
safetensors, which is on the preload list and light)."""

from __future__ import annotations

import os
import signal

import pytest

from supervisor import WorkerCrashed
from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.script import read_line, supervisor_script

MODES = {"heavy": "tests.helpers.loaders:preloads", "light": DIAG}
TORCH_MODES = {**MODES, "heavy": "tests.helpers.loaders:tensors"}  # "heavy" imports torch


def _standby_ready(sup) -> int:
    wait_until(lambda: sup.status()["standby_ready"], T, "a warm standby done with its preload")
    pid = sup.status()["standby_pid"]
    with open(f"/proc/{pid}/maps") as f:
        assert "safetensors" in f.read(), "the standby says ready but has not imported what it was asked to"
    return pid


def test_a_light_mode_does_not_wait_for_a_standby_still_importing(supervisor_from):
    """A spare still busy importing is no faster than a fresh process for a
    light mode: the switch starts one and leaves the spare for later."""
    sup = supervisor_from(config_text(TORCH_MODES))
    sup.switch_mode("heavy").result(T)  # a torch mode: its spare spends seconds importing torch
    spare = wait_until(lambda: sup.status()["standby_pid"], T, "a warm standby")
    assert not sup.status()["standby_ready"]
    result = sup.switch_mode("light").result(T)
    assert result["standby"] is False and sup.status()["standby_pid"] == spare


def test_no_standby_until_a_mode_needs_heavy_libraries(supervisor_from):
    sup = supervisor_from(config_text(MODES))
    sup.switch_mode("light").result(T)
    assert sup.status()["standby_pid"] is None


def test_the_next_switch_takes_the_standby_which_had_preloaded(supervisor_from):
    sup = supervisor_from(config_text(MODES))
    first = sup.switch_mode("heavy").result(T)
    assert first["standby"] is False and sup.submit("was_preloaded").result(T) is False
    spare = _standby_ready(sup)
    light = sup.switch_mode("light").result(T)
    assert light["standby"] is False and sup.status()["standby_pid"] == spare  # left for a mode it suits
    heavy = sup.switch_mode("heavy").result(T)
    assert heavy["standby"] is True and heavy["pid"] == spare
    assert sup.submit("was_preloaded").result(T) is True  # imported before the loader ran
    for key in ("stop_seconds", "spawn_seconds", "load_seconds", "seconds"):
        assert heavy[key] is not None and heavy[key] >= 0


def test_a_dead_standby_is_replaced_by_a_fresh_worker(supervisor_from):
    sup = supervisor_from(config_text(MODES))
    sup.switch_mode("heavy").result(T)
    spare = _standby_ready(sup)
    os.kill(spare, signal.SIGKILL)
    result = sup.restart().result(T)
    assert result["standby"] is False and result["pid"] != spare and pid_gone(spare)


def test_warm_standby_false_keeps_none(supervisor_from):
    sup = supervisor_from(config_text(MODES, supervisor={"warm_standby": False}))
    sup.switch_mode("heavy").result(T)
    sup.switch_mode("light").result(T)
    assert sup.status()["standby_pid"] is None


def test_shutdown_reaps_the_standby(supervisor_from):
    sup = supervisor_from(config_text(MODES))
    sup.switch_mode("heavy").result(T)
    spare = _standby_ready(sup)
    sup.shutdown(drain=True)
    assert pid_gone(spare)


def test_a_standby_dies_with_its_supervisor(tmp_path):
    config = tmp_path / "g.toml"
    config.write_text(config_text(MODES))
    script = f"""
sup = Supervisor({str(config)!r}).start()
sup.switch_mode("heavy").result(60)
while not sup.status()["standby_pid"]:
    time.sleep(0.02)
print(json.dumps(sup.status()["standby_pid"]), flush=True)
time.sleep(600)
"""
    with supervisor_script(script) as proc:
        spare = read_line(proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(T)
        wait_until(lambda: pid_gone(spare), 10, "the standby to die with its supervisor")


def test_a_standby_taken_while_still_importing_becomes_the_worker(supervisor_from):
    """A heavy mode takes the spare even mid-import (it is ahead of a fresh
    process); its readiness signal then has nobody to read it, harmlessly."""
    sup = supervisor_from(config_text(TORCH_MODES))
    sup.switch_mode("heavy").result(T)
    spare = wait_until(lambda: sup.status()["standby_pid"], T, "a warm standby")
    assert not sup.status()["standby_ready"]
    result = sup.restart().result(T)
    assert result["status"] == "restarted" and result["standby"] is True and result["pid"] == spare
    assert sup.submit("make", {"n": 2}).result(T)["float"].tolist() == [0.0, 1.0]


def test_a_reload_that_turns_the_standby_off_stops_it(supervisor_from, write_config):
    from supervisor.config import load

    sup = supervisor_from(config_text(MODES))
    sup.switch_mode("heavy").result(T)
    spare = _standby_ready(sup)
    sup.reload(load(write_config(config_text(MODES, supervisor={"warm_standby": False})))).result(T)
    assert sup.status()["standby_pid"] is None and pid_gone(spare)
    assert sup.switch_mode("light").result(T)["standby"] is False


def test_a_light_mode_never_takes_a_standby_and_stays_light(supervisor_from):
    """A spare carries the imports of the heavy modes; a light worker made
    from it would hold them too. It starts fresh. A worker that was a spare
    says nothing about it on stderr, so its crash reports quote only what
    the mode wrote."""
    sup = supervisor_from(config_text({**MODES, "heavy_diag": "tests.helpers.loaders:heavy_crashing"}))
    sup.switch_mode("heavy_diag").result(T)
    spare = _standby_ready(sup)
    light = sup.switch_mode("light").result(T)
    assert light["standby"] is False and light["pid"] != spare
    with open(f"/proc/{light['pid']}/maps") as f:
        assert "safetensors" not in f.read(), "the light worker carries the heavy mode's imports"
    heavy = sup.switch_mode("heavy_diag").result(T)
    assert heavy["standby"] is True and heavy["pid"] == spare
    with pytest.raises(WorkerCrashed) as info:
        sup.submit("crash", {"say": "the mode's own last words"}).result(T)
    assert "the mode's own last words" in str(info.value) and "standby" not in str(info.value)
