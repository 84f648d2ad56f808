"""A program of the user's around a Supervisor, in a process of its own: the
tests kill it as the OOM killer or an operator would, and look at what is
left of its workers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence

from tests.helpers import T, repo_pythonpath


@contextlib.contextmanager
def supervisor_script(body: str, prefix: Sequence[str] = ()) -> Iterator[subprocess.Popen]:
    """A supervisor in a process of its own, running ``body`` (with json,
    sys, time and Supervisor imported) and printing JSON lines as it goes;
    killed, reaped and closed on the way out, whatever the test did to it.
    ``prefix``: a command that runs the interpreter (``setpriv ...``)."""
    code = "import json, sys, time\nfrom supervisor import Supervisor\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=repo_pythonpath())
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(T)
        proc.stdout.close()


def read_line(proc: subprocess.Popen):
    """The script's next JSON line."""
    line = proc.stdout.readline()
    assert line, f"the supervisor script ended early with {proc.wait(T)}"
    return json.loads(line)
