"""``gpuvisor check-config``, through the console script's module: the file
parsed as the daemon parses it, then every loader imported in a throwaway
worker (run as workers run, touching no GPU, calling no ``load``), each
mistake named with the file, the line of the mode's ``loader`` and the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, T, repo_pythonpath

pytestmark = pytest.mark.process

EXAMPLE = ROOT / "examples" / "scorer" / "gpuvisor.toml"


def check_config(*args: str | Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": repo_pythonpath(), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "gpuvisor", "check-config", *map(str, args)], env=env, cwd="/",
                          capture_output=True, text=True, timeout=T)  # fmt: skip


def test_the_examples_config_is_ready_to_serve():
    done = check_config(EXAMPLE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["scorer: ok (scorer:load)", f"{EXAMPLE}: ok, 1 mode"]
    report = json.loads(check_config(EXAMPLE, "--json").stdout)
    assert report == {"ok": True, "file": str(EXAMPLE), "modes": {"scorer": {"ok": True, "loader": "scorer:load"}}}


def test_a_mistake_in_the_file_names_its_line_and_key_in_words_and_in_json(tmp_path):
    config = tmp_path / "g.toml"
    config.write_text('[modes.a]\nloader = "worker.modes.diag:load"\n\n[http.models.m]\nmode = "b"\nembeddings = "e"\n')
    done = check_config(config)
    assert done.returncode == 6 and done.stdout == ""
    assert f"{config}:5: [http.models.m] key 'mode': expected one of the modes ['a'], got 'b'" in done.stderr
    report = json.loads(check_config(config, "--json").stdout)
    assert report["ok"] is False and report["modes"] == {} and f"{config}:5: " in report["error"]


LOADERS = {
    "found_nowhere.py": None,
    "needs_a_library.py": "import os\nimport helper_of_mine\n\n\ndef load():\n    return {}\n",
    "helper_of_mine.py": "import json\n\nimport some_missing_lib\n",
    "no_function.py": "def load_it():\n    return {}\n",
    "raises_at_import.py": "X = 1\nraise RuntimeError('broken at import')\n",
    "loads_nothing.py": "import os\n\n\ndef load():\n    open(os.environ['NEVER'], 'w').close()\n    return {}\n",
}


def test_each_loader_mistake_is_named_on_its_modes_loader_line(tmp_path):
    modes = tmp_path / "modes"
    modes.mkdir()
    for name, text in LOADERS.items():
        if text is not None:
            (modes / name).write_text(text)
    config = tmp_path / "g.toml"
    config.write_text('[supervisor]\nloader_path = ["modes"]\n\n'  # line 4 onwards: a mode per two lines
                      '[modes.nowhere]\nloader = "found_nowhere:load"\n'
                      '[modes.library]\nloader = "needs_a_library:load"\n'
                      '[modes.function]\nloader = "no_function:load"\n'
                      '[modes.import]\nloader = "raises_at_import:load"\n'
                      '[modes.fine]\nloader = "loads_nothing:load"\n')  # fmt: skip
    done = check_config(config, "--json")
    assert done.returncode == 6, done.stderr
    report = json.loads(done.stdout)
    found = report["modes"]
    assert report["ok"] is False and found["fine"] == {"ok": True, "loader": "loads_nothing:load"}
    assert [found[m]["line"] for m in ("nowhere", "library", "function", "import")] == [5, 7, 9, 11]
    assert found["nowhere"]["error"].startswith(f"{config}:5: [modes.nowhere] key 'loader': LoaderNotFound: ")
    assert "name the folder that holds it in [supervisor] loader_path" in found["nowhere"]["error"]
    assert found["library"]["error"] == (
        f"{config}:7: [modes.library] key 'loader': MissingDependency: the loader 'needs_a_library:load' "
        f"({modes}/needs_a_library.py line 2) needs the module 'some_missing_lib', which is not installed in the "
        f"worker's Python ({sys.executable}): pip install it there"
    )
    assert "loader_path" not in found["library"]["error"]
    assert f"module 'no_function' ({modes}/no_function.py) has no 'load'" in found["function"]["error"]
    assert found["import"]["error"].endswith(f"RuntimeError: broken at import (at {modes}/raises_at_import.py line 2)")
    words = check_config(config)
    assert words.returncode == 6 and "4 of 5 modes cannot be imported" in words.stderr
    assert "fine: ok (loads_nothing:load)" in words.stdout and found["library"]["error"] in words.stdout


def test_the_check_imports_as_a_worker_does_and_sees_no_gpu(tmp_path):
    """In /, with -P and PYTHONSAFEPATH=1, every device hidden: what the
    module saw at import, written where the test reads it."""
    seen = tmp_path / "seen.json"
    (tmp_path / "looks.py").write_text(
        "import json, os, sys\n"
        f"with open({str(seen)!r}, 'w') as f:\n"
        "    json.dump([os.getcwd(), sys.flags.safe_path, os.environ.get('CUDA_VISIBLE_DEVICES')], f)\n"
        "print('printed at import')\n"
        "def load():\n    raise AssertionError('check-config must not call load')\n"
    )
    config = tmp_path / "g.toml"
    config.write_text('[supervisor]\nloader_path = ["."]\n[modes.looks]\nloader = "looks:load"\n')
    done = check_config(config, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(seen.read_text()) == ["/", True, ""]
