"""The README as a newcomer uses it: the five-minute tour's commands run
in a shell, through the console script (and curl, for the HTTP door)
against a real ``gpuvisor serve`` on its default endpoint, each output
checked line by line against the README (``…`` stands for what differs from
run to run), with and without ``XDG_RUNTIME_DIR``; its chat through the
``openai`` SDK; and the first Python example run as it is written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.client.endpoint import unreachable
from tests.helpers import ROOT, T
from tests.helpers.daemon import GPUVISOR

BIN = Path(GPUVISOR).parent
README = (ROOT / "README.md").read_text()


def _block(after: str, fence: str = "```") -> list[str]:
    """The lines of the first fenced block after the text ``after``."""
    section = README[README.index(after) :]
    start = section.index(fence + "\n") if fence == "```" else section.index(fence)
    body = section[start:].split("\n", 1)[1]
    return body[: body.index("```")].rstrip("\n").split("\n")


def _tour() -> list[tuple[str, int, list[str]]]:
    """(command, expected exit code, expected output lines) for each ``$`` line."""
    steps: list[tuple[str, int, list[str]]] = []
    for line in _block("## A five-minute tour"):
        if line.startswith("$ "):
            command, _, comment = line[2:].partition("  #")
            code = re.search(r"exit code (\d+)", comment)
            steps.append((command.strip(), int(code.group(1)) if code else 0, []))
        else:
            steps[-1][2].append(line)
    return steps


def _matches(expected: list[str], actual: list[str]) -> str | None:
    """None if ``actual`` is ``expected`` with each ``…`` filled in: within a
    line it stands for any text, and a line that is only ``…`` for any
    number of lines. Runs of spaces count as one. Otherwise, what did not
    match."""
    squeeze = re.compile(r"\s+")  # alignment is for the eye: runs of spaces count as one
    expected = [squeeze.sub(" ", line).strip() for line in expected]
    actual = [squeeze.sub(" ", line).strip() for line in actual]
    j, skipping = 0, False
    for line in expected:
        if line.strip() == "…":
            skipping = True
            continue
        pattern = re.compile(".*".join(re.escape(part) for part in line.split("…")))
        while j < len(actual) and not pattern.fullmatch(actual[j]):
            if not skipping:
                return f"expected {line!r}, got {actual[j]!r}"
            j += 1
        if j == len(actual):
            return f"expected {line!r}, found nothing more"
        j, skipping = j + 1, False
    if j < len(actual) and not skipping:
        return f"unexpected line {actual[j]!r}"
    return None


def _shell(changes: dict[str, str | None]) -> dict[str, str]:
    """The user's shell: no NOTIFY_SOCKET, no PYTHONPATH, the console script
    on PATH; ``changes`` over it (None: unset)."""
    changes = {"RUNTIME_DIRECTORY": None, "PYTHONPATH": None, "NOTIFY_SOCKET": None, "HF_HUB_OFFLINE": "1",
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **changes}  # fmt: skip
    return {k: v for k, v in {**os.environ, **changes}.items() if v is not None}


def _run(command: str, env: dict[str, str], as_user: list[str] | None = None) -> subprocess.CompletedProcess:
    """A README line as the user's shell runs it: variables and ``$(...)`` expanded by bash."""
    return subprocess.run([*(as_user or []), "bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=2 * T)  # a model load among them  # fmt: skip


@pytest.mark.daemon
def test_the_tour_runs_and_prints_what_the_readme_shows(daemon, tmp_path):
    """With XDG_RUNTIME_DIR set, as in a desktop session; before the last
    step, while the daemon still runs, the chat through the SDK."""
    changes: dict[str, str | None] = {"XDG_RUNTIME_DIR": str(tmp_path)}
    env = _shell(changes)
    endpoint = f"ipc://{tmp_path}/gpuvisor/gpuvisor.sock"  # the default endpoint for this XDG_RUNTIME_DIR
    serve = daemon(argv=[GPUVISOR, "serve"], endpoint=endpoint, env=_shell(changes), notify=False)
    steps = _tour()
    assert [s[0].split()[1] for s in steps][:2] == ["switch", "submit"] and steps[-1][0] == "gpuvisor stop"
    assert any(s[0].startswith("curl ") for s in steps), "the tour shows the HTTP door too"
    for command, code, expected in steps:
        assert command.split()[0] in ("gpuvisor", "curl"), command
        if command == "gpuvisor stop":
            chat = subprocess.run([sys.executable, "-c", "\n".join(_block("Chat works on the built-in config", "```python"))],
                                  env=env, capture_output=True, text=True, timeout=2 * T)  # fmt: skip
            assert chat.returncode == 0, chat.stderr[-3000:]
            assert chat.stdout.rstrip("\n").endswith(" 8"), f"the README says: gibberish, 8 tokens; {chat.stdout!r}"
        done = _run(command, env)
        # Progress lines go to stderr and the README leaves them out; an error is shown.
        output = (done.stdout + (done.stderr if code else "")).rstrip("\n").split("\n")
        assert done.returncode == code, f"{command}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        problem = _matches(expected, output)
        assert problem is None, f"{command}: {problem}\n--- printed:\n" + "\n".join(output)
    assert serve.wait() == 0  # `gpuvisor stop` returned once it had stopped


@pytest.mark.daemon
def test_the_curl_line_works_without_xdg_runtime_dir(daemon):
    """Where XDG_RUNTIME_DIR is not set (su, a container, cron) the daemon's
    folder is /tmp/gpuvisor-UID, and the README's curl line finds it all the
    same. That folder is this user's, on a machine others may test on too:
    where a daemon of theirs already serves there, the test is skipped."""
    endpoint = f"ipc:///tmp/gpuvisor-{os.getuid()}/gpuvisor.sock"
    if unreachable(endpoint, 2.0) is None:
        pytest.skip(f"a daemon of this user already serves at {endpoint}, the endpoint this test needs")
    env = _shell({"XDG_RUNTIME_DIR": None})
    daemon(argv=[GPUVISOR, "serve"], endpoint=endpoint, env=env, notify=False)
    (line,) = [command for command, _, _ in _tour() if command.startswith("curl ")]
    done = _run(line, env)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    answer = json.loads(done.stdout)
    assert answer["model"] == "all-minilm-l6-v2" and len(answer["data"][0]["embedding"]) == 384, answer


@pytest.mark.process
@pytest.mark.slow
def test_the_first_python_example_runs_as_written():
    code = "\n".join(_block("# gpuvisor", "```python"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=2 * T,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(done.stdout) > 0  # the streamed (gibberish) text
