"""The warm standby: a spare worker that has imported what the modes
preload and what earlier workers imported, taken into service by the next
switch, importing at the lowest CPU priority beside a light worker and
stopped while a heavy one is busy. Real
processes throughout; ``tests.helpers.loaders:preloads`` stands in for a
torch mode (it imports safetensors, which is on the preload list and light).
A spare that must still be importing when a test looks imports a module
that waits for a file the test creates (a gate): it is a spare mid-import
for as long as the test needs, whatever the machine's speed."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from supervisor import WorkerCrashed
from supervisor.engine import standby
from tests.helpers import T, pid_gone, repo_pythonpath, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.script import read_line, supervisor_script
from worker.standby import IMPORTER_NAME

pytestmark = pytest.mark.process

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


# ------------------------------------------------------------ imports at the lowest priority

_GATE = """
import os, time
deadline = time.monotonic() + {bound}
mine = {path!r} + "-" + str(os.getpid())
while not (os.path.exists({path!r}) or os.path.exists(mine)) and time.monotonic() < deadline:
    time.sleep(0.01)
"""

_HOLDING = """
import os, sys, time


def load():
    preloaded = "standby_gate" in sys.modules

    def hold(payload):
        open(payload["started"], "w").close()
        deadline = time.monotonic() + {bound}
        while not os.path.exists(payload["until"]):
            if time.monotonic() > deadline:
                raise TimeoutError("nobody released the job")
            time.sleep(0.01)
        return True

    return {{"hold": hold, "was_preloaded": lambda payload: preloaded, "pid": lambda payload: os.getpid(),
             "policy": lambda payload: os.sched_getscheduler(0)}}
"""


class Gated:
    """Modes "light" (``standby_holding``: a ``hold`` job that runs until a
    file exists) and "heavy" (the same, preloading ``standby_gate``, whose
    import lasts until ``open()``, or ``open(pid)`` for that spare alone)."""

    def __init__(self, folder: Path, monkeypatch):
        self.folder = folder
        (folder / "standby_gate.py").write_text(_GATE.format(bound=2 * T, path=str(folder / "gate-open")))
        (folder / "standby_holding.py").write_text(_HOLDING.format(bound=2 * T))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), repo_pythonpath()]))
        self.modes = {"light": "standby_holding:load", "heavy": {"loader": "standby_holding:load",
                                                                   "preload": ["standby_gate"]}}  # fmt: skip
        self.jobs = 0

    def open(self, pid: int | None = None) -> None:
        (self.folder / ("gate-open" if pid is None else f"gate-open-{pid}")).touch()

    def heavy_and_next_spare(self, sup) -> tuple[int, int]:
        """The spare of the start taken by "heavy", and the next one, which
        is stopped at its gate: (the worker's pid, the next spare's pid)."""
        first = wait_until(lambda: sup.status()["standby_pid"], T, "the spare the preload starts with the supervisor")
        self.open(first)
        assert sup.switch_mode("heavy").result(T)["pid"] == first
        spare = wait_until(lambda: sup.status()["standby_pid"], T, "the next spare, once the heavy worker is idle")
        wait_until(lambda: _importing_at_the_lowest_priority(spare), T, "the next spare's importing thread")
        return first, spare

    def hold(self, sup):
        """A job that is running when this returns; ``release()`` ends it."""
        self.jobs += 1
        started, until = self.folder / f"started-{self.jobs}", self.folder / f"until-{self.jobs}"
        job = sup.submit("hold", {"started": str(started), "until": str(until)})
        wait_until(started.exists, T, "the hold job to start")
        job.release = until.touch
        return job


@pytest.fixture
def gated(tmp_path, monkeypatch) -> Gated:
    return Gated(tmp_path, monkeypatch)


def _policies(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of process ``pid``: its name and its scheduling policy."""
    threads = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                threads[tid] = (f.read().strip(), os.sched_getscheduler(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return threads


def _importing_at_the_lowest_priority(pid: int) -> bool:
    return any(name == IMPORTER_NAME and policy == os.SCHED_IDLE for name, policy in _policies(pid).values())


def _spare_importing(sup) -> int:
    spare = wait_until(lambda: sup.status()["standby_pid"], T, "the spare a mode's preload starts with the supervisor")
    wait_until(lambda: _importing_at_the_lowest_priority(spare), T, "the spare's importing thread under SCHED_IDLE")
    return spare


def _state(pid: int) -> str:
    """The process's state in /proc/PID/stat: T is stopped (SIGSTOP)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_a_spare_imports_beside_a_busy_light_worker_in_a_thread_at_the_lowest_priority(supervisor_from, gated):
    """Beside a light worker's job the spare goes on importing, in a thread
    under SCHED_IDLE; its main thread, the one that becomes the worker,
    keeps the normal policy."""
    sup = supervisor_from(config_text(gated.modes))
    sup.switch_mode("light").result(T)
    job = gated.hold(sup)
    spare = _spare_importing(sup)
    assert os.sched_getscheduler(spare) == os.SCHED_OTHER  # its main thread: the tid is the pid
    assert _state(spare) != "T" and not sup.status()["standby_ready"]
    gated.open()
    wait_until(lambda: sup.status()["standby_ready"], T, "the spare to finish its imports while the job runs")
    job.release()
    assert job.result(T) is True


def test_a_spare_still_importing_is_stopped_while_a_heavy_worker_runs_a_job_and_goes_on_once_it_idles(
    supervisor_from, gated
):
    """SCHED_IDLE takes no CPU time from a torch worker, but what the cores
    share still slows its jobs: beside a heavy worker a spare is stopped."""
    sup = supervisor_from(config_text(gated.modes))
    _, spare = gated.heavy_and_next_spare(sup)
    job = gated.hold(sup)
    wait_until(lambda: _state(spare) == "T", T, "the spare to be stopped while the heavy worker's job runs")
    job.release()
    assert job.result(T) is True
    wait_until(lambda: _state(spare) != "T", T, "the spare to go on once the worker is idle")
    gated.open(spare)
    wait_until(lambda: sup.status()["standby_ready"], T, "the spare to finish its imports")
    again = gated.hold(sup)  # the job's turn has passed: a spare done importing would have been stopped by now
    assert _state(spare) != "T", "a spare done importing costs nothing, and is left alone"
    again.release()
    assert again.result(T) is True


def test_a_stopped_spare_taken_by_a_switch_becomes_a_working_worker(supervisor_from, gated, monkeypatch):
    sup = supervisor_from(config_text(gated.modes))
    _, spare = gated.heavy_and_next_spare(sup)
    # The spare stays stopped after the job, so the switch surely takes it
    # stopped (the loop thread reads the module's setting at each turn).
    monkeypatch.setattr(standby, "RESUME_AFTER_IDLE_S", 10 * T)
    job = gated.hold(sup)
    wait_until(lambda: _state(spare) == "T", T, "the spare to be stopped while the job runs")
    job.release()
    assert job.result(T) is True
    assert _state(spare) == "T"
    gated.open(spare)  # it cannot see this until it runs again
    result = sup.restart().result(T)
    assert result["standby"] is True and result["pid"] == spare
    assert sup.submit("was_preloaded").result(T) is True and sup.submit("pid").result(T) == spare
    assert sup.submit("policy").result(T) == os.SCHED_OTHER and _state(spare) != "T"


def test_a_spare_taken_mid_import_runs_its_jobs_at_the_normal_priority(supervisor_from, gated):
    sup = supervisor_from(config_text(gated.modes))
    spare = _spare_importing(sup)
    switched = sup.switch_mode("heavy")  # taken mid-import: the module under way is finished first
    gated.open()
    result = switched.result(T)
    assert result["standby"] is True and result["pid"] == spare
    assert sup.submit("policy").result(T) == os.SCHED_OTHER
    assert all(policy != os.SCHED_IDLE for _, policy in _policies(spare).values()), _policies(spare)


_LEAVE_SCHED_IDLE = """
import os, threading
def leave():
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        print("left")
    except PermissionError:
        print("kept")
t = threading.Thread(target=leave)
t.start()
t.join()
"""


def _gated_supervisor(config: Path) -> str:
    """The start of a supervisor script over ``Gated``'s modes: the gate's
    folder on the workers' path, the supervisor started, and its first
    spare's pid in ``first``."""
    return f"""
import os
os.environ["PYTHONPATH"] = {os.environ["PYTHONPATH"]!r}
sup = Supervisor({str(config)!r}).start()
while not sup.status()["standby_pid"]:
    time.sleep(0.02)
first = sup.status()["standby_pid"]
"""


def _without_leaving_sched_idle() -> list[str]:
    """A command prefix under which a thread cannot leave SCHED_IDLE, as for
    an unprivileged user (root without CAP_SYS_NICE); the test is skipped
    where there is none."""
    prefix = ["setpriv", "--bounding-set=-sys_nice"] if os.geteuid() == 0 else []
    try:
        said = subprocess.run(
            [*prefix, sys.executable, "-c", _LEAVE_SCHED_IDLE], capture_output=True, text=True, timeout=T
        )
    except FileNotFoundError:
        pytest.skip("no setpriv to run the supervisor without CAP_SYS_NICE")
    if said.stdout.strip() != "kept":
        pytest.skip(f"a thread may leave SCHED_IDLE here ({said.stdout.strip() or said.stderr.strip()})")
    return prefix


def test_a_spare_taken_mid_import_that_only_the_lowest_priority_may_finish_starts_afresh(gated, tmp_path):
    """Unprivileged, the importer cannot leave SCHED_IDLE, and waiting for it
    has no bound on a busy machine: the spare becomes a fresh worker (the
    same process), which never imported the gate (still closed) and runs
    its jobs at the normal priority."""
    prefix = _without_leaving_sched_idle()
    config, go = tmp_path / "g.toml", tmp_path / "go"
    config.write_text(config_text(gated.modes))
    script = (
        _gated_supervisor(config)
        + f"""
print(json.dumps(first), flush=True)
while not os.path.exists({str(go)!r}):
    time.sleep(0.02)
result = sup.switch_mode("heavy").result(60)
print(json.dumps([result["standby"], result["pid"]]), flush=True)
print(json.dumps([sup.submit("policy").result(60), sup.submit("was_preloaded").result(60)]), flush=True)
time.sleep(600)
"""
    )
    with supervisor_script(script, prefix=prefix) as proc:
        spare = read_line(proc)
        wait_until(lambda: _importing_at_the_lowest_priority(spare), T, "the spare's importing thread under SCHED_IDLE")
        go.touch()
        assert read_line(proc) == [True, spare]
        assert read_line(proc) == [os.SCHED_OTHER, False]


def test_the_next_spare_starts_only_once_a_heavy_worker_is_idle(supervisor_from, monkeypatch):
    monkeypatch.setattr(standby, "RESUME_AFTER_IDLE_S", 10 * T)  # idle for long enough: not in this test's time
    sup = supervisor_from(config_text(HEAVY_PRELOADS))
    spare = wait_until(lambda: sup.status()["standby_pid"], T, "the spare a mode's preload starts with the supervisor")
    assert sup.switch_mode("heavy").result(T)["pid"] == spare
    assert sup.status()["standby_pid"] is None, "a new spare started while the worker had just loaded"
    monkeypatch.setattr(standby, "RESUME_AFTER_IDLE_S", 0.0)
    assert wait_until(lambda: sup.status()["standby_pid"], T, "the next spare, now that the worker is idle") != spare


def _spares() -> set[int]:
    """The standby processes this test session has started and not reaped."""
    return {p.pid for p in psutil.Process().children(recursive=True) if "--standby" in p.cmdline()}


def test_while_jobs_wait_for_a_mode_that_takes_the_spare_its_successor_starts(supervisor_from, gated):
    """The successor imports beside the light worker, as the spare does."""
    sup = supervisor_from(config_text(gated.modes))
    spare = _spare_importing(sup)
    sup.switch_mode("light").result(T)
    job = gated.hold(sup)
    waiting = sup.submit("pid", mode="heavy")  # waits for the job in flight, then a switch takes the spare
    successor = wait_until(lambda: _spares() - {spare}, T, "the spare's successor")
    assert len(successor) == 1 and sup.status()["standby_pid"] == spare
    (pid,) = successor
    wait_until(lambda: _importing_at_the_lowest_priority(pid), T, "the successor's importing thread")
    assert _state(pid) != "T"
    gated.open()
    job.release()
    assert waiting.result(T) == spare
    assert sup.status()["standby_pid"] == pid


def test_a_spare_that_preloads_less_than_a_worker_taught_gives_way_once_its_successor_is_ready(supervisor_from, gated):
    """A mode not yet known to be heavy starts fresh and, in READY, teaches
    what it imported: the spare there is kept, still the one a switch would
    take, until a successor that preloads that too is ready."""
    modes = {**gated.modes, "newcomer": "tests.helpers.loaders:preloads"}  # imports safetensors
    sup = supervisor_from(config_text(modes))
    first = _spare_importing(sup)
    gated.open(first)
    wait_until(lambda: sup.status()["standby_ready"], T, "the first spare done with its preload")
    assert sup.switch_mode("newcomer").result(T)["standby"] is False
    successor = wait_until(lambda: _spares() - {first}, T, "a successor that preloads what the newcomer taught")
    assert len(successor) == 1 and sup.status()["standby_pid"] == first
    (pid,) = successor
    gated.open(pid)
    wait_until(lambda: sup.status()["standby_pid"] == pid, T, "the successor, once ready, to be the spare")
    wait_until(lambda: pid_gone(first), T, "the spare that preloads less to be gone")
    with open(f"/proc/{pid}/maps") as f:
        assert "safetensors" in f.read()


def test_a_stopped_spare_is_reaped_at_shutdown(supervisor_from, gated):
    sup = supervisor_from(config_text(gated.modes))
    _, spare = gated.heavy_and_next_spare(sup)
    job = gated.hold(sup)
    wait_until(lambda: _state(spare) == "T", T, "the spare to be stopped while the job runs")
    sup.shutdown(drain=False)
    assert pid_gone(spare)
    assert job.exception(T) is not None


def test_a_stopped_spare_dies_with_its_supervisor(gated, tmp_path):
    """A stopped process runs nothing, so it cannot notice it is orphaned:
    the kernel's SIGKILL (PDEATHSIG, armed before the spare may be stopped)
    is what ends it."""
    config, started, until = tmp_path / "g.toml", tmp_path / "started", tmp_path / "until"
    config.write_text(config_text(gated.modes))
    script = (
        _gated_supervisor(config)
        + f"""
open({str(tmp_path)!r} + f"/gate-open-{{first}}", "w").close()
sup.switch_mode("heavy").result(60)
while sup.status()["standby_pid"] in (None, first):
    time.sleep(0.02)
sup.submit("hold", {{"started": {str(started)!r}, "until": {str(until)!r}}})
print(json.dumps(sup.status()["standby_pid"]), flush=True)
time.sleep(600)
"""
    )
    with supervisor_script(script) as proc:
        spare = read_line(proc)
        wait_until(started.exists, T, "the hold job to start")
        wait_until(lambda: _state(spare) == "T", T, "the spare to be stopped while the job runs")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(T)
        wait_until(lambda: pid_gone(spare), T, "the stopped spare to die with its supervisor")


# ------------------------------------------------------------ what to preload, from the start

HEAVY_PRELOADS = {"heavy": {"loader": "tests.helpers.loaders:preloads", "preload": ["safetensors"]}, "light": DIAG}


def test_a_preload_in_the_config_gives_a_spare_at_start_which_the_first_switch_takes(supervisor_from):
    sup = supervisor_from(config_text(HEAVY_PRELOADS))
    spare = _standby_ready(sup)
    assert sup.status()["mode"] is None and sup.status()["worker_pid"] is None  # before any mode loaded
    result = sup.switch_mode("heavy").result(T)
    assert result["standby"] is True and result["pid"] == spare
    assert sup.submit("was_preloaded").result(T) is True


def test_no_preload_and_no_state_gives_no_spare_at_start(supervisor_from):
    sup = supervisor_from(config_text(MODES))
    assert sup.status()["standby_pid"] is None
    assert sup.switch_mode("heavy").result(T)["standby"] is False  # not known to be heavy yet


@pytest.mark.parametrize("where", ["state_dir", "STATE_DIRECTORY"])
def test_the_state_directory_remembers_what_modes_import_for_the_next_supervisor(
    supervisor_from, tmp_path, monkeypatch, where
):
    state = tmp_path / "state"
    if where == "STATE_DIRECTORY":  # systemd's StateDirectory=
        monkeypatch.setenv("STATE_DIRECTORY", str(state))
        text = config_text(MODES)
    else:
        text = config_text(MODES, supervisor={"state_dir": str(state)})
    first = supervisor_from(text)
    first.switch_mode("light").result(T)
    first.switch_mode("heavy").result(T)
    saved = json.loads((state / "standby.json").read_text())  # written when READY was handled: before the result
    assert "safetensors" in saved["preload"] and saved["heavy"] == {"light": False, "heavy": True}
    first.shutdown(drain=False)

    second = supervisor_from(text)
    spare = _standby_ready(second)
    assert second.status()["mode"] is None
    result = second.switch_mode("heavy").result(T)
    assert result["standby"] is True and result["pid"] == spare
    assert second.submit("was_preloaded").result(T) is True


@pytest.mark.parametrize("text", ["{not json", '{"version": 1, "preload": "safetensors", "heavy": {}}', "[]"])
def test_a_corrupt_state_file_is_ignored_with_a_log_line_and_replaced(supervisor_from, tmp_path, caplog, text):
    state = tmp_path / "state"
    state.mkdir()
    (state / "standby.json").write_text(text)
    sup = supervisor_from(config_text(MODES, supervisor={"state_dir": str(state)}))
    assert any(
        r.levelno == logging.WARNING and f"ignoring {state / 'standby.json'}" in r.getMessage() for r in caplog.records
    )
    assert sup.status()["standby_pid"] is None
    assert sup.switch_mode("heavy").result(T)["standby"] is False
    assert json.loads((state / "standby.json").read_text())["heavy"] == {"heavy": True}
