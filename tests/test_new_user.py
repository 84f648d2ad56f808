"""The path docs/modes.md walks a new user through, end to end, with the
commands a user types: copy the example mode into a project of one's own,
run its tests with the kit, check the config, serve it with the console
script, and call both its tasks (a batched one and a stream) with the CLI,
the Python ``Client`` and curl, seeing a switch's progress on the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from supervisor.client import Client
from tests.helpers import T, repo_pythonpath
from tests.helpers.daemon import GPUVISOR
from tests.test_http import curl, sse

pytestmark = pytest.mark.daemon

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "scorer"


def run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    return subprocess.run(argv, capture_output=True, text=True, timeout=T, cwd=cwd, env=env)


def test_a_new_user_tests_checks_serves_and_calls_a_mode_of_their_own(daemon, tmp_path):
    project = tmp_path / "my-mode"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("__pycache__"))
    config = str(project / "gpuvisor.toml")

    # 1. The mode's own tests, with the kit, from the project's folder.
    tested = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_scorer.py", cwd=project)
    assert tested.returncode == 0 and " passed" in tested.stdout, tested.stdout + tested.stderr

    # 2. The config and its loader, checked before serving.
    checked = run(GPUVISOR, "check-config", config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "scorer: ok (scorer:load)" in checked.stdout

    # 3. Served by the console script, from another folder (the worker never looks in the working one).
    folder = tempfile.mkdtemp(prefix="gv-")  # short: a socket path must stay under 108 bytes
    endpoint = f"ipc://{folder}/g.sock"
    d = daemon(argv=[GPUVISOR, "--config", config, "--endpoint", endpoint, "serve"], endpoint=endpoint)
    ep = ("--endpoint", endpoint)

    # 4. The CLI: a switch shows its phases on stderr; both tasks answer.
    restarted = run(GPUVISOR, *ep, "restart", "scorer")
    assert restarted.returncode == 0, restarted.stderr
    assert [line.split(": ")[1].split(" ")[0] for line in restarted.stderr.splitlines()] == [
        "stopping", "starting", "loading", "ready"], restarted.stderr  # fmt: skip
    scored = run(GPUVISOR, *ep, "--json", "submit", "score", '{"text": "a great day"}', "--mode", "scorer")
    assert scored.returncode == 0 and json.loads(scored.stdout)["value"] == {"score": 4.0, "batch": 1}, scored
    streamed = run(GPUVISOR, *ep, "--json", "submit", "words", '{"text": "a great day"}', "--stream")
    assert streamed.returncode == 0, streamed.stderr
    lines = [json.loads(line) for line in streamed.stdout.splitlines()]
    assert [line["chunk"]["word"] for line in lines if "chunk" in line] == ["a", "great", "day"], lines

    # 5. Python, through the daemon: a batch of jobs sent together, and the stream.
    with Client(endpoint) as c:
        futures = [c.submit("score", {"text": text}, mode="scorer") for text in ("good", "bad", "meh")]
        assert [f.result(T)["score"] for f in futures] == [2.0, -2.0, -1.0]
        stream = c.submit("words", {"text": "fine"}, mode="scorer", stream=True)
        assert list(stream) == [{"word": "fine", "score": 1.0}] and stream.result() == {"score": 1.0}

    # 6. curl, on the HTTP socket beside the daemon's own, found as docs/modes.md finds it.
    unix = run(GPUVISOR, *ep, "status", "--http-socket").stdout.strip()
    assert unix == os.path.join(folder, "http.sock")
    body = {"mode": "scorer", "task": "score", "payload": {"text": "a great day"}}
    assert curl("http://localhost/v1/jobs", body, unix=unix) == (200, {"result": {"score": 4.0, "batch": 1}})
    status, text = curl("http://localhost/v1/jobs", {**body, "task": "words", "stream": True}, unix=unix)
    assert status == 200 and sse(text) == [
        {"chunk": {"word": "a", "score": 0.0}}, {"chunk": {"word": "great", "score": 4.0}},
        {"chunk": {"word": "day", "score": 0.0}}, {"result": {"score": 4.0}}, "[DONE]"]  # fmt: skip
    assert run(GPUVISOR, *ep, "stop").returncode == 0 and d.wait() == 0
