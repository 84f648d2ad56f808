"""A client looks for the daemon at its default endpoint only in a runtime
folder of its own user that nobody else can change: another local user
could make ``/tmp/gpuvisor-<uid>`` first and answer there in the daemon's
place. Through the console script and the Python client, against a folder
chowned to another uid (the tests run as root) with something listening in
it that must never see a connection."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from protocol import DaemonUnavailable
from supervisor.client import Client
from supervisor.client.endpoint import UnsafeRuntimeDir
from tests.helpers import ROOT, T

NOBODY = 65534

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(os.geteuid() != 0, reason="makes a folder of another user: needs root"),
]


def shell_env(xdg: str) -> dict[str, str]:
    """A user's shell whose XDG_RUNTIME_DIR is ``xdg``; this checkout on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR")}
    return {**env, "XDG_RUNTIME_DIR": xdg, "PYTHONPATH": str(ROOT)}


def gpuvisor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor.service.cli", *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=T)  # fmt: skip


@pytest.fixture
def impostor(tmp_path):
    """The runtime folder, made first by someone else, and a socket listening
    in it where the daemon's would be: a fake daemon."""
    folder = tmp_path / "gpuvisor"
    folder.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / "gpuvisor.sock"))
    listener.listen()
    listener.setblocking(False)
    yield folder, listener
    listener.close()


def never_connected(listener: socket.socket) -> bool:
    try:
        listener.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.mark.parametrize("command", ["status", "stop"])
def test_the_console_script_refuses_a_runtime_folder_of_another_user(impostor, tmp_path, command):
    folder, listener = impostor
    os.chown(folder, NOBODY, NOBODY)
    done = gpuvisor(command, env=shell_env(str(tmp_path)))
    assert done.returncode == 6, done.stderr
    assert f"the runtime folder {folder} belongs to nobody (uid {NOBODY}), not to you (root (uid 0))" in done.stderr
    assert "--endpoint" in done.stderr and "XDG_RUNTIME_DIR" in done.stderr
    assert never_connected(listener)


def test_the_console_script_refuses_a_runtime_folder_others_can_change(impostor, tmp_path):
    folder, listener = impostor
    os.chmod(folder, 0o777)
    done = gpuvisor("status", env=shell_env(str(tmp_path)))
    assert done.returncode == 6, done.stderr
    assert f"the runtime folder {folder} can be changed by others (mode 0777)" in done.stderr
    assert f"chmod 700 {folder}" in done.stderr
    assert never_connected(listener)


def test_a_private_folder_or_none_at_all_is_looked_in_as_before(tmp_path):
    env = shell_env(str(tmp_path))
    done = gpuvisor("status", env=env)
    assert done.returncode == 3 and f"no daemon at ipc://{tmp_path}/gpuvisor/gpuvisor.sock" in done.stderr
    (tmp_path / "gpuvisor").mkdir(mode=0o700)
    done = gpuvisor("status", env=env)
    assert done.returncode == 3 and "there is no socket file" in done.stderr


def test_an_endpoint_named_outright_is_not_judged_by_the_runtime_folder(impostor, tmp_path):
    """A shared daemon's folder (a system daemon's, reached through its
    socket_group) is rightly another user's: naming the endpoint is how a
    client says it trusts it."""
    folder, listener = impostor
    os.chown(folder, NOBODY, NOBODY)
    done = gpuvisor("--endpoint", f"ipc://{folder}/gpuvisor.sock", "status", "--daemon-timeout", "0.5",
                    env=shell_env(str(tmp_path)))  # fmt: skip
    assert done.returncode == 3, done.stderr  # it connected, and the fake said nothing
    assert not never_connected(listener)


def test_the_python_client_refuses_it_too(impostor, tmp_path, monkeypatch):
    folder, listener = impostor
    os.chown(folder, NOBODY, NOBODY)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(UnsafeRuntimeDir, match=f"the runtime folder {folder} belongs to nobody") as refused:
        Client()
    assert isinstance(refused.value, DaemonUnavailable)  # what a caller of Client already catches
    assert never_connected(listener)


def test_the_tmp_folder_another_user_made_first_is_refused(tmp_path):
    """The case itself: no XDG_RUNTIME_DIR, and /tmp/gpuvisor-UID made by
    someone else before this user ever ran gpuvisor. The client is a forked
    child whose user is an unused uid; root made its folder first."""
    uid = 4242
    folder = f"/tmp/gpuvisor-{uid}"
    shutil.rmtree(folder, ignore_errors=True)  # what a run that was killed left
    os.mkdir(folder, 0o700)
    try:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            said = "the client connected"
            try:
                os.environ.pop("XDG_RUNTIME_DIR", None)
                os.environ.pop("RUNTIME_DIRECTORY", None)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                Client()
            except UnsafeRuntimeDir as exc:
                said = str(exc)
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
                said = f"the child failed: {exc!r}"
            finally:
                os.write(write_end, said.encode())
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            said = f.read().decode()
        os.waitpid(pid, 0)
        assert said.startswith(f"the runtime folder {folder} belongs to root (uid 0), not to you (uid {uid})"), said
    finally:
        os.rmdir(folder)
