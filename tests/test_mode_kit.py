"""``gpuvisor.testing``, the kit a mode's author tests with: a real worker
through the real Supervisor, its tasks called, batched and streamed; and a
loader's mistakes as its author meets them: ``load_mode`` in a test, and
``gpuvisor switch`` against a real daemon, naming the loader's file and
line in the CLI and in the daemon's log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpuvisor.testing import load_mode, mode_fixture
from supervisor import JobFailed, ModeLoadError, WorkerCrashed
from tests.helpers import T, pid_gone, repo_pythonpath, wait_until
from tests.helpers.config import DIAG, DIAG_HOOKS, config_text
from tests.helpers.daemon import serving

diag = mode_fixture(DIAG_HOOKS["loader"], DIAG_HOOKS["args"])


@pytest.mark.process
def test_call_returns_the_result_or_raises_the_jobs_typed_error(diag):
    assert diag.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
    assert diag.call("pid") == diag.pid and diag.status["mode"] == "diag"
    with pytest.raises(JobFailed, match="on purpose"):
        diag.call("fail", {"message": "on purpose"})
    assert "batch_echo" in diag.tasks and "count" in diag.tasks


@pytest.mark.process
def test_batch_hands_a_batched_handler_every_payload_in_one_call(diag):
    before = diag.status["batches"]["count"]
    for size in (2, 5, 8):  # the first goes at once after a batch of one: still one call
        results = diag.batch("batch_echo", list(range(size)))
        assert results == [{"payload": i, "batch": size} for i in range(size)]
    assert diag.status["batches"]["count"] == before + 3 and diag.status["batches"]["last"] == 8
    nine = diag.batch("batch_echo", list(range(9)))  # past its max_batch of 8: two calls
    assert [r["batch"] for r in nine] == [8] * 8 + [1]
    assert diag.batch("echo", ["a", "b"]) == ["a", "b"], "a task that takes one payload runs them one by one"
    with pytest.raises(JobFailed, match="batch_fail on purpose"):
        diag.batch("batch_fail", [1, 2])
    assert diag.batch("batch_echo", []) == []


@pytest.mark.process
def test_stream_yields_the_chunks_then_holds_the_return_value(diag):
    stream = diag.stream("count", {"n": 4})
    assert list(stream) == [0, 1, 2, 3] and stream.result(T) == {"count": 4}


@pytest.mark.process
def test_restart_gives_a_fresh_worker_and_a_crash_is_a_typed_error():
    with load_mode(DIAG, name="d") as mode:
        first = mode.pid
        assert mode.restart()["pid"] != first and pid_gone(first)
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            mode.call("crash", {"how": "kill"})
        assert mode.batch("batch_echo", [1, 2]) == [{"payload": 1, "batch": 2}, {"payload": 2, "batch": 2}]
        last = mode.pid
    assert pid_gone(last), "the worker is reaped when the block ends"


# A loader whose mistake is two files deep: the error names the loader's own line.
MODULES = {
    "mine.py": "import helper_of_mine\n\n\ndef load(size=1):\n    helper_of_mine.build(size)\n    return {}\n",
    "helper_of_mine.py": "def build(size):\n    raise RuntimeError(f'cannot build size {size}')\n",
    "needy.py": "import needs_more\n\n\ndef load():\n    return {}\n",
    "needs_more.py": "import some_missing_lib\n",
}


@pytest.fixture(scope="module")
def modes_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("modes")
    for name, text in MODULES.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.process
def test_a_load_that_raises_fails_load_mode_naming_the_loaders_line(modes_folder):
    with pytest.raises(ModeLoadError) as failed:
        load_mode("mine:load", {"size": 3}, loader_path=[modes_folder])
    assert f"RuntimeError: cannot build size 3 (at {modes_folder}/mine.py line 5)" in str(failed.value)


@pytest.mark.daemon
def test_gpuvisor_switch_shows_the_loaders_file_and_line_and_so_does_the_log(modes_folder):
    text = config_text({"diag": DIAG, "mine": "mine:load", "needy": "needy:load"},
                       supervisor={"loader_path": [str(modes_folder)], "warm_standby": False})  # fmt: skip
    with serving(text) as d:

        def switch(mode: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "gpuvisor", "--endpoint", d.endpoint, "switch", mode],
                                  env={"PYTHONPATH": repo_pythonpath()}, capture_output=True, text=True, timeout=T)  # fmt: skip

        raised = f"RuntimeError: cannot build size 1 (at {modes_folder}/mine.py line 5)"
        done = switch("mine")
        assert done.returncode == 1 and raised in done.stderr, done.stderr
        needy = (f"the loader 'needy:load' ({modes_folder}/needy.py line 1) needs the module 'some_missing_lib', "
                 f"which is not installed in the worker's Python ({sys.executable}): pip install it there")  # fmt: skip
        done = switch("needy")
        assert done.returncode == 1 and needy in done.stderr, done.stderr
        wait_until(lambda: raised in d.output() and needy in d.output(), T, "both failures in the daemon's log")
