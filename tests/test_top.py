"""``gpuvisor top``: the frame drawn from hand-made pictures (what a failed
switch, a broken mode, a missing memory figure and a name with rich markup
look like), then the console script against a real daemon: one frame in a
pipe, ``--json``, a live view left with Ctrl-C or by the daemon's stop, and
no daemon at all."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import time
from typing import Any

import pytest
from rich.console import Console

from supervisor.service.top import render, sparkline
from tests.helpers import T
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import GPUVISOR, serving

AT = 1_700_000_000.0


def picture(**changes: Any) -> dict[str, Any]:
    """A picture as ``Glance.picture`` makes it: one CPU device on mode
    ``b``, switched to from ``a``; ``changes`` replace whole keys."""
    device = {
        "name": "cpu", "device": "cpu", "mode": "b", "worker_state": "ready", "worker_pid": 4187,
        "switching_to": None, "in_flight": 0, "restarts": 0, "jobs_done": 3, "rss_bytes": 30 * 2**20,
        "vram_bytes": None, "gpu_name": None, "gpu_used_bytes": None, "gpu_total_bytes": None, "last_error": None,
        "failed_reason": None, "broken": {}, "idle_unloaded": None, "standby_ready": False,
    }  # fmt: skip
    switch = {
        "device": "cpu", "mode": "b", "previous": "a", "why": "switch", "started": AT - 5, "phase": "ready",
        "phases": {"stop": 0.01, "reclaim": 0.02, "spawn": 0.16, "load": 2.1}, "seconds": 2.31,
        "outcome": "ready", "error": None,
    }  # fmt: skip
    shown = {
        "at": AT, "state": "running", "failed_reason": None, "config": "/etc/gpuvisor.toml", "modes": ["a", "b"],
        "devices": [device], "queued": 0, "waiting": {}, "restarts": 0, "jobs_done": 3, "broken_modes": {},
        "switches": [switch], "memory": {"cpu": [[AT - 4, 30 * 2**20, None, None], [AT - 2, 40 * 2**20, None, None]]},
        "errors": [], "operator": True,
    }  # fmt: skip
    return {**shown, **changes}


def text(shown: dict[str, Any], width: int = 132) -> str:
    """The frame as a pipe gets it: plain text, no colour."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(render(shown, width))
    return out.getvalue()


# ---------------------------------------------------------------- the frame


@pytest.mark.unit
def test_sparkline_scales_between_the_lowest_and_highest_and_leaves_gaps():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([10, None, 80], 8) == "▁ █", "a missing figure is a gap, not a zero"
    assert sparkline([None, None], 8) == "  "
    assert sparkline([], 8) == sparkline([1, 2], 0) == ""
    assert sparkline([5, 5, 5], 8) == "▁▁▁"
    assert sparkline([1000, 1001, 1000], 8) == "▁▁▁", "a steady figure reads flat, its noise not stretched"


@pytest.mark.unit
def test_sparkline_squeezes_many_values_keeping_each_peak():
    values = [1.0] * 100
    values[37] = 9.0
    line = sparkline(values, 10)
    assert len(line) == 10 and line == "▁▁▁█▁▁▁▁▁▁", line
    assert sparkline([None] * 50 + [1.0, 2.0] * 25, 10) == "     ▁▁▁▁▁"


@pytest.mark.unit
def test_the_frame_names_the_state_each_device_and_the_last_switch_with_its_phases():
    frame = text(picture())
    assert "gpuvisor running" in frame and "/etc/gpuvisor.toml" in frame
    assert time.strftime("%H:%M:%S", time.localtime(AT)) in frame, "the daemon's time"
    device_row = next(line for line in frame.splitlines() if line.startswith("cpu ") and "4187" in line)
    for shown in ("b", "ready", "4187", "30.0 MiB"):
        assert shown in device_row, device_row
    switch_row = next(line for line in frame.splitlines() if "b ← a" in line)
    for shown in ("switch", "ready", "2.31 s", "stop 0.01 · reclaim 0.02 · spawn 0.16 · load 2.10 s", "█"):
        assert shown in switch_row, switch_row
    assert "RSS" in frame and "▁█" in frame, frame


@pytest.mark.unit
def test_a_failed_switch_shows_its_error_and_lands_among_the_errors():
    failed = {**picture()["switches"][0], "mode": "big", "outcome": "failed", "phase": "failed", "phases": {},
              "seconds": 0.8, "error": "LoadError: out of memory"}  # fmt: skip
    error = {"t": AT - 1, "device": "cpu", "mode": "big", "what": "switch to 'big' failed: LoadError: out of memory"}
    frame = text(picture(switches=[failed], errors=[error]))
    switch_row = next(line for line in frame.splitlines() if "big ← a" in line)
    assert "failed" in switch_row and "LoadError: out of memory" in switch_row and "0.80 s" in switch_row, frame
    assert "last errors" in frame and "switch to 'big' failed" in frame, frame


@pytest.mark.unit
def test_a_switch_under_way_shows_its_phase_and_time_so_far():
    going = {**picture()["switches"][0], "outcome": "under way", "phase": "load", "phases": {}, "seconds": None,
             "started": AT - 3}  # fmt: skip
    frame = text(picture(switches=[going]))
    row = next(line for line in frame.splitlines() if "b ← a" in line)
    assert "under way: load" in row and "3.00 s" in row, row


@pytest.mark.unit
def test_broken_modes_queue_gpu_and_a_switch_under_way_on_a_device_show():
    device = {**picture()["devices"][0], "name": "cuda:0", "broken": {"big": {"reason": "crashed 3 times"}},
              "gpu_used_bytes": 3 * 2**30, "gpu_total_bytes": 80 * 2**30, "vram_bytes": 2 * 2**30,
              "switching_to": "small", "worker_state": "stopping"}  # fmt: skip
    frame = text(picture(
        state="failed", failed_reason="every mode is broken", devices=[device], queued=4,
        waiting={"b": {"jobs": 4, "oldest_s": 12.5}},
        broken_modes={"big": {"reason": "crashed 3 times in 60 s", "retry_in_s": 30.0},
                      "small": {"reason": "an operator stopped it", "retry_in_s": None}},
    ))  # fmt: skip
    assert "gpuvisor failed (every mode is broken)" in frame, frame
    assert "broken modes" in frame and "crashed 3 times in 60 s" in frame and "in 30.00 s" in frame, frame
    assert "by an operator's switch or restart" in frame, frame
    row = next(line for line in frame.splitlines() if line.startswith("cuda:0"))
    assert "3.0 / 80.0 GiB" in row and "2.0 GiB" in row and row.rstrip().endswith("big"), row
    assert "b → small" in row and "stopping" in row, "the mode it is switching to, beside its mode"
    queue = next(line for line in frame.splitlines() if "12.50 s" in line)
    assert queue.split()[:2] == ["b", "4"], queue


@pytest.mark.unit
def test_missing_memory_figures_are_gaps_and_dashes():
    memory = {"cpu": [[AT - 6, None, None, None], [AT - 4, 30 * 2**20, None, None], [AT - 2, None, None, None]]}
    device = {**picture()["devices"][0], "rss_bytes": None, "worker_pid": None, "mode": None}
    frame = text(picture(memory=memory, devices=[device]))
    row = next(line for line in frame.splitlines() if line.startswith("cpu") and "RSS" in line)
    assert " ▁ " in row, "a sample without a figure is a gap either side of the one with it"
    assert row.split()[-5:] == ["-", "30.0", "MiB", "30.0", "MiB"], "now: none; lowest and highest: the one figure"
    assert "VRAM" not in frame.split("memory")[-1], "no VRAM line where no sample had one"
    empty = text(picture(memory={"cpu": [[AT, None, None, None]]}))
    assert "RSS" in empty


@pytest.mark.unit
def test_names_with_rich_markup_are_shown_as_written():
    device = {**picture()["devices"][0], "mode": "[red]x", "last_error": "[bold]boom"}
    switch = {**picture()["switches"][0], "mode": "[red]x", "previous": "[/]"}
    error = {"t": AT, "device": "cpu", "mode": "[red]x", "what": "[bold]boom[/bold]"}
    frame = text(picture(devices=[device], switches=[switch], errors=[error], modes=["[red]x"],
                         waiting={"[red]x": {"jobs": 1, "oldest_s": 1.0}}, memory={"[link=x]cpu": []}))  # fmt: skip
    assert "[red]x ← [/]" in frame and "[bold]boom[/bold]" in frame and "modes [red]x" in frame, frame
    assert frame.count("[red]x") >= 4, frame


@pytest.mark.unit
def test_an_empty_picture_still_draws():
    frame = text({"at": None, "state": None})
    assert "gpuvisor -" in frame and "DEVICE" in frame


# ---------------------------------------------------------------- the console script


def gpuvisor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GPUVISOR, *args], capture_output=True, text=True, timeout=T, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, COLUMNS="132"))  # fmt: skip


def on_a_terminal(endpoint: str, until: Any) -> tuple[int, str]:
    """``gpuvisor top`` with a pseudo-terminal for its stdout and stderr, as
    over SSH; ``until(proc)`` once it has drawn twice; its exit status and
    everything it wrote."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([GPUVISOR, "top", "--interval", "0.2", "--endpoint", endpoint], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=dict(os.environ, COLUMNS="132", LINES="60"))  # fmt: skip
    os.close(slave)
    written, deadline, done = b"", time.monotonic() + T, False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            try:
                chunk = os.read(master, 65536) if ready else b""
            except OSError:  # EIO: the last writer has gone
                break
            if ready and not chunk:
                break
            written += chunk
            if not done and written.count(b"last switches") >= 2:
                until(proc)
                done = True
        return proc.wait(T), written.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        os.close(master)


@pytest.mark.daemon
def test_top_against_a_daemon_one_frame_json_live_and_its_stop():
    config = config_text({"a": DIAG, "b": DIAG}, supervisor={"warm_standby": False})
    with serving(config) as daemon:  # after: no traceback in the daemon's output
        for mode in ("a", "b"):
            switched = gpuvisor("switch", mode, "--endpoint", daemon.endpoint)
            assert switched.returncode == 0, switched.stderr
        frame = gpuvisor("top", "--once", "--endpoint", daemon.endpoint)
        assert frame.returncode == 0 and frame.stderr == "", frame
        assert "gpuvisor running" in frame.stdout and "modes a, b" in frame.stdout, frame.stdout
        row = next(line for line in frame.stdout.splitlines() if "b ← a" in line)
        for shown in ("switch", "ready", "stop ", "spawn ", "load "):
            assert shown in row, frame.stdout
        assert "a ← -" in frame.stdout, frame.stdout
        piped = gpuvisor("top", "--endpoint", daemon.endpoint)  # stdout a pipe: one frame, no --once needed
        assert piped.returncode == 0 and "b ← a" in piped.stdout, piped

        shown = gpuvisor("top", "--json", "--endpoint", daemon.endpoint)
        assert shown.returncode == 0, shown.stderr
        value = json.loads(shown.stdout)["value"]
        assert [(s["mode"], s["previous"], s["outcome"]) for s in value["switches"]] == [("b", "a", "ready"),
                                                                                        ("a", None, "ready")]  # fmt: skip
        assert value["devices"][0]["mode"] == "b" and set(value["switches"][0]["phases"]) >= {"stop", "spawn", "load"}

        status, written = on_a_terminal(daemon.endpoint, lambda proc: proc.send_signal(signal.SIGINT))
        assert status == 0 and "Traceback" not in written and "b ← a" in written, written[-2000:]

        status, written = on_a_terminal(daemon.endpoint, lambda proc: daemon.stop())
        assert status == 3 and "Traceback" not in written, written[-2000:]
        assert "is `gpuvisor serve` running?" in written, written[-2000:]


@pytest.mark.process
def test_top_without_a_daemon_is_exit_3_like_every_command(tmp_path):
    endpoint = f"ipc://{tmp_path}/g.sock"
    for args in (["top"], ["top", "--once"]):
        out = gpuvisor(*args, "--endpoint", endpoint)
        assert out.returncode == 3 and out.stdout == "", out
        assert out.stderr.startswith("gpuvisor: DaemonUnavailable: no daemon at") and "running?" in out.stderr, out
    out = gpuvisor("top", "--json", "--endpoint", endpoint)
    assert out.returncode == 3 and json.loads(out.stdout)["ok"] is False, out
    out = gpuvisor("top", "--interval", "0", "--endpoint", endpoint)
    assert out.returncode == 2 and "expected a number of seconds > 0" in out.stderr, out
