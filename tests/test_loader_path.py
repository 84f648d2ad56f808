"""Loader modules that live beside the config file are found wherever the
daemon runs, because ``[supervisor] loader_path`` names their folder
(relative to the config file's folder): under systemd the working directory
is /, and PYTHONPATH is whatever the unit says. Run through the console
script, from /, with no PYTHONPATH."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import ConfigError, ModeLoadError, load_config
from supervisor.client import Client
from tests.conftest import wait_until

T = 60
GPUVISOR = str(Path(sys.executable).parent / "gpuvisor")
MODULE = "import os\n\ndef load_tiny():\n    return {'where': lambda payload: (__file__, os.getcwd())}\n"


def _serve(config: Path, endpoint: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen([GPUVISOR, "serve", "--config", str(config), "--endpoint", endpoint], cwd="/", env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _answering(endpoint: str, proc: subprocess.Popen) -> bool:
    assert proc.poll() is None, f"the daemon exited with {proc.returncode}"
    try:
        with Client(endpoint, timeout=1) as c:
            return bool(c.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


@pytest.mark.parametrize("loader_path", ['["."]', '["../beside"]', None])
def test_a_loader_beside_the_config_is_found_from_systemds_working_directory(tmp_path, loader_path):
    folder = tmp_path / ("beside" if loader_path == '["../beside"]' else "etc")
    folder.mkdir()
    (folder / "mymodes.py").write_text(MODULE)
    config = tmp_path / "etc" / "gpuvisor.toml"
    config.parent.mkdir(exist_ok=True)
    setting = f"[supervisor]\nloader_path = {loader_path}\n" if loader_path else ""
    config.write_text(setting + '[modes.tiny]\nloader = "mymodes:load_tiny"\n')
    endpoint = f"ipc://{tmp_path}/run/g.sock"
    proc = _serve(config, endpoint)
    try:
        wait_until(lambda: _answering(endpoint, proc), T, "the daemon to answer")
        with Client(endpoint) as c:
            job = c.submit("where", mode="tiny")
            if loader_path is None:
                with pytest.raises(ModeLoadError, match="cannot import 'mymodes'.*working directory is /.*loader_path"):
                    job.result(T)
            else:
                assert job.result(T) == [str(folder / "mymodes.py"), "/"]
            c.shutdown(drain=False)
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)


def test_a_loader_path_that_is_not_a_folder_is_a_config_error_naming_the_line(tmp_path):
    config = tmp_path / "gpuvisor.toml"
    config.write_text('[supervisor]\nloader_path = ["nope"]\n[modes.tiny]\nloader = "mymodes:load_tiny"\n')
    with pytest.raises(
        ConfigError, match=rf"gpuvisor.toml:2: \[supervisor\] key 'loader_path': 'nope' is {tmp_path}/nope"
    ):
        load_config(config)
