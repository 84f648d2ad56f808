"""Loader modules that live beside the config file are found wherever the
daemon runs, because ``[supervisor] loader_path`` names their folder
(relative to the config file's folder): under systemd the working directory
is /, and PYTHONPATH is whatever the unit says. Run through the console
script, from /, with no PYTHONPATH but this checkout.

And nothing in the daemon's working directory reaches a worker: every
worker starts in / without the working directory on its ``sys.path``."""

from __future__ import annotations

import psutil
import pytest

from supervisor import ConfigError, ModeLoadError, load_config
from tests.helpers import ROOT, T, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.daemon import GPUVISOR

MODULE = "import os\n\ndef load_tiny():\n    return {'where': lambda payload: (__file__, os.getcwd())}\n"


@pytest.mark.daemon
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
    # PYTHONPATH names this checkout alone (the code under test, wherever another is installed), not the loader.
    d = daemon(argv=[GPUVISOR, "serve", "--config", str(config), "--endpoint", endpoint], cwd="/",
               env={"PYTHONPATH": str(ROOT)})  # fmt: skip
    with d.client() as c:
        job = c.submit("where", mode="tiny")
        if loader_path is None:
            with pytest.raises(ModeLoadError, match="'mymodes'.*never the working directory.*loader_path"):
                job.result(T)
        else:
            assert job.result(T) == [str(folder / "mymodes.py"), "/"]
        c.shutdown(drain=False)
    assert d.wait() == 0


@pytest.mark.unit
def test_a_loader_path_that_is_not_a_folder_is_a_config_error_naming_the_line(tmp_path):
    config = tmp_path / "gpuvisor.toml"
    config.write_text('[supervisor]\nloader_path = ["nope"]\n[modes.tiny]\nloader = "mymodes:load_tiny"\n')
    with pytest.raises(
        ConfigError, match=rf"gpuvisor.toml:2: \[supervisor\] key 'loader_path': 'nope' is {tmp_path}/nope"
    ):
        load_config(config)


@pytest.mark.unit
def test_a_relative_state_dir_starts_from_the_config_files_folder(tmp_path, monkeypatch):
    """Like loader_path: a daemon under systemd runs in /, so a relative
    state_dir must not land there."""
    config = tmp_path / "etc" / "gpuvisor.toml"
    config.parent.mkdir()
    config.write_text('[supervisor]\nstate_dir = "state"\n[modes.diag]\nloader = "worker.modes.diag:load"\n')
    monkeypatch.chdir("/")
    assert load_config(config).state_dir == str(tmp_path / "etc" / "state")


# What a working directory may hold: the worker's own entry point, the
# protocol it speaks, and a package it imports, each broken.
DECOYS = {
    "worker.py": "raise SystemExit(0)\n",  # once `python -m worker` ran this: "exited with code 0 while loading"
    "protocol.py": "raise ImportError('the protocol.py of the working directory')\n",
    "zmq/__init__.py": "raise ImportError('the zmq folder of the working directory')\n",
    "mymodes.py": "def load():\n    return {'where': lambda payload: 'the working directory'}\n",
}


def isolated(pid: int) -> tuple[str, bool, bool]:
    """A worker's working directory, and whether it runs with -P and PYTHONSAFEPATH=1."""
    process = psutil.Process(pid)
    return process.cwd(), "-P" in process.cmdline(), process.environ().get("PYTHONSAFEPATH") == "1"


@pytest.mark.daemon
def test_what_the_daemons_working_directory_holds_never_reaches_a_worker(daemon, tmp_path):
    """The console script started in a folder of decoys, as someone would
    from a shell: the switch loads the real worker, jobs run, the warm
    standby (started at once, as the mode has a preload) is as isolated,
    and a loader only the working directory holds is not found."""
    for name, text in DECOYS.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    modes = {"diag": {"loader": DIAG, "preload": ["json"]}, "here": "mymodes:load"}
    config = tmp_path / "etc" / "gpuvisor.toml"
    config.parent.mkdir()
    config.write_text(config_text(modes))
    endpoint = f"ipc://{tmp_path}/run/g.sock"
    d = daemon(argv=[GPUVISOR, "serve", "--config", str(config), "--endpoint", endpoint], cwd=str(tmp_path))
    with d.client() as c:
        spare = wait_until(lambda: c.status()["standby_pid"], T, "the warm standby")
        assert isolated(spare) == ("/", True, True)
        wait_until(lambda: c.status()["standby_ready"], T, "the warm standby done with its preload")
        switched = c.switch_mode("diag").result(T)
        assert switched["standby"] is True and switched["pid"] == spare
        assert c.submit("echo", {"ok": 1}).result(T) == {"ok": 1}
        fresh = c.restart("diag").result(T)["pid"]  # a fresh process, not a standby
        assert fresh != spare and isolated(fresh) == ("/", True, True)
        assert c.submit("echo", [1, 2]).result(T) == [1, 2]
        with pytest.raises(ModeLoadError, match="cannot import 'mymodes'"):
            c.switch_mode("here").result(T)
        c.shutdown(drain=False)
    assert d.wait() == 0
