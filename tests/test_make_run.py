"""``make run`` as a person runs it: the Makefile's own recipe line serves
the daemon and its status page on loopback, where a browser reaches it (a
unix socket it cannot), and ``--ui`` refuses an address that is not
loopback."""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import T, wait_until
from tests.helpers.daemon import RunningDaemon, free_port

pytestmark = pytest.mark.daemon

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the environment make made, whose console script this is


def make_run_line(port: int) -> list[str]:
    """The recipe of ``run:`` in the Makefile, its variables filled in as make would."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n\t(.+)$", makefile, re.M)
    assert recipe is not None, "the Makefile has a run target with one recipe line"
    line = recipe.group(1).replace("$(VENV)", str(VENV)).replace("$(UI_PORT)", str(port))
    assert "$(" not in line, f"a make variable left in {line!r}"
    return line.split()


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=T) as answer:
        return answer.status, answer.headers.get("content-type", ""), answer.read().decode()


def test_make_runs_line_serves_the_status_page_on_loopback(tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    port = free_port()
    argv = make_run_line(port)
    assert argv[-3:] == ["serve", "--ui", f"127.0.0.1:{port}"]
    daemon = RunningDaemon(argv=argv, endpoint=f"ipc://{runtime}/gpuvisor/gpuvisor.sock",
                           env={"XDG_RUNTIME_DIR": str(runtime), "RUNTIME_DIRECTORY": None})  # fmt: skip
    try:
        page = f"http://127.0.0.1:{port}/ui"
        wait_until(lambda: f"status page: {page}" in daemon.output(), T, "the daemon to say where its page is")
        status, media, html = get(page)
        assert (status, media.split(";")[0]) == (200, "text/html") and "/ui/app.js" in html
        _, _, glance = get(f"http://127.0.0.1:{port}/v1/glance")
        picture = json.loads(glance)
        assert picture["state"] == "running" and "diag" in picture["modes"]
        assert picture["operator"] is False  # loopback TCP without tokens: nobody can be told apart
        with daemon.client() as client:
            client.switch_mode("diag").result(T)
        wait_until(lambda: json.loads(get(f"http://127.0.0.1:{port}/v1/glance")[2])["switches"], T,
                   "the switch in the page's picture")  # fmt: skip
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_ui_refuses_an_address_other_machines_reach(tmp_path):
    endpoint = f"ipc://{tmp_path}/g.sock"
    argv = [sys.executable, "-m", "supervisor.service.cli", "--endpoint", endpoint, "serve", "--ui", "0.0.0.0:8421"]
    daemon = RunningDaemon(argv=argv, wait_ready=False)
    try:
        assert daemon.wait() == 6, daemon.output()
        assert "--ui takes a loopback HOST:PORT" in daemon.output()
    finally:
        daemon.close()
