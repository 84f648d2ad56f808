"""Loader modules that live beside the config file are found wherever the
daemon runs, because ``[supervisor] loader_path`` names their folder
(relative to the config file's folder): under systemd the working directory
is /, and PYTHONPATH is whatever the unit says. Run through the console
script, from /, with no PYTHONPATH."""

from __future__ import annotations

import pytest

from supervisor import ConfigError, ModeLoadError, load_config
from tests.helpers import T
from tests.helpers.daemon import GPUVISOR

MODULE = "import os\n\ndef load_tiny():\n    return {'where': lambda payload: (__file__, os.getcwd())}\n"


@pytest.mark.parametrize("loader_path", ['["."]', '["../beside"]', None])
def test_a_loader_beside_the_config_is_found_from_systemds_working_directory(daemon, tmp_path, loader_path):
    folder = tmp_path / ("beside" if loader_path == '["../beside"]' else "etc")
    folder.mkdir()
    (folder / "mymodes.py").write_text(MODULE)
    config = tmp_path / "etc" / "gpuvisor.toml"
    config.parent.mkdir(exist_ok=True)
    setting = f"[supervisor]\nloader_path = {loader_path}\n" if loader_path else ""
    config.write_text(setting + '[modes.tiny]\nloader = "mymodes:load_tiny"\n')
    endpoint = f"ipc://{tmp_path}/run/g.sock"
    d = daemon(argv=[GPUVISOR, "serve", "--config", str(config), "--endpoint", endpoint], cwd="/",
               env={"PYTHONPATH": None})  # fmt: skip
    with d.client() as c:
        job = c.submit("where", mode="tiny")
        if loader_path is None:
            with pytest.raises(ModeLoadError, match="cannot import 'mymodes'.*working directory is /.*loader_path"):
                job.result(T)
        else:
            assert job.result(T) == [str(folder / "mymodes.py"), "/"]
        c.shutdown(drain=False)
    assert d.wait() == 0


def test_a_loader_path_that_is_not_a_folder_is_a_config_error_naming_the_line(tmp_path):
    config = tmp_path / "gpuvisor.toml"
    config.write_text('[supervisor]\nloader_path = ["nope"]\n[modes.tiny]\nloader = "mymodes:load_tiny"\n')
    with pytest.raises(
        ConfigError, match=rf"gpuvisor.toml:2: \[supervisor\] key 'loader_path': 'nope' is {tmp_path}/nope"
    ):
        load_config(config)


def test_a_relative_state_dir_starts_from_the_config_files_folder(tmp_path, monkeypatch):
    """Like loader_path: a daemon under systemd runs in /, so a relative
    state_dir must not land there."""
    config = tmp_path / "etc" / "gpuvisor.toml"
    config.parent.mkdir()
    config.write_text('[supervisor]\nstate_dir = "state"\n[modes.diag]\nloader = "worker.modes.diag:load"\n')
    monkeypatch.chdir("/")
    assert load_config(config).state_dir == str(tmp_path / "etc" / "state")
