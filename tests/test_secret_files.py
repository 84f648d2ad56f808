"""Files that decide who gets in are refused when anyone but the daemon's
user or root could change them (or a folder on their way), and said in the
log when others can read them: a real ``gpuvisor serve`` with a token file
others can write, or that another user owns, stops with exit 6 before it
serves; the folder cases are checked on the functions themselves.

The tests run as root, so "another user" is uid 65534 (nobody), made the
owner with chown, and a daemon that is not root is a child process run as
that user."""

from __future__ import annotations

import logging
import os
import tempfile

import pytest

from supervisor.service.front import EndpointError
from supervisor.service.secret_files import check_secret_file, check_trusted_folder
from tests.helpers import T
from tests.helpers.config import DIAG
from tests.test_http import http_config

NOBODY = 65534
TOKEN = "a-token-of-sixteen-or-more\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes files of another user: needs root")


def secret(folder, name: str = "tokens", mode: int = 0o600, text: str = TOKEN) -> str:
    path = folder / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def folder(parent, name: str, mode: int):
    made = parent / name
    made.mkdir()
    os.chmod(made, mode)
    return made


@pytest.mark.daemon
@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_token_file_others_can_write_stops_the_daemon_naming_the_file_and_the_fix(daemon, tmp_path, mode):
    tokens = secret(tmp_path, mode=mode)
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": tokens}), wait_ready=False)
    assert d.wait() == 6
    out = d.output()
    assert f"[http] token_file {tokens} can be changed by" in out and f"chmod go-w {tokens}" in out, out
    assert f"mode {mode:04o}" in out


@pytest.mark.daemon
def test_a_token_file_of_another_user_stops_the_daemon(daemon, tmp_path):
    tokens = secret(tmp_path)
    os.chown(tokens, NOBODY, NOBODY)
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": tokens}), wait_ready=False)
    assert d.wait() == 6
    out = d.output()
    assert f"{tokens} belongs to nobody (uid {NOBODY}), not to root" in out and f"chown root {tokens}" in out, out


@pytest.mark.daemon
def test_a_private_token_file_serves_and_one_every_user_can_read_is_said_in_the_log(daemon, tmp_path):
    tokens = secret(tmp_path, mode=0o644)
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": tokens}))
    with d.client() as c:
        assert c.submit("echo", 1, mode="diag").result(T) == 1
    assert f"[http] token_file {tokens} can be read by every user (mode 0644); chmod go-r {tokens}" in d.output()


@pytest.mark.unit
def test_a_private_file_in_private_folders_passes_without_a_word(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gpuvisor"):
        check_secret_file(secret(tmp_path), "[http] token_file")
        check_secret_file(secret(tmp_path, "readonly", 0o400), "[http] token_file")
    assert caplog.records == []


@pytest.mark.unit
def test_a_secret_its_group_can_read_is_said_in_the_log(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gpuvisor"):
        check_secret_file(secret(tmp_path, mode=0o640), "[daemon] curve_secret_key")
    assert "[daemon] curve_secret_key" in caplog.text and "can be read by the group" in caplog.text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mode", "who"), [(0o777, "every user"), (0o775, "the group"), (0o757, "every user"), (0o770, "the group")]
)
def test_a_folder_others_can_change_without_the_sticky_bit_is_refused(tmp_path, mode, who):
    shared = folder(tmp_path, "shared", mode)
    path = secret(shared)
    with pytest.raises(EndpointError) as refused:
        check_secret_file(path, "[http] token_file")
    message = str(refused.value)
    assert f"[http] token_file {path} lies in {shared}, which {who}" in message
    assert f"mode {mode:04o}, no sticky bit" in message and f"chmod go-w {shared}" in message


@pytest.mark.unit
def test_a_folder_with_the_sticky_bit_is_safe_as_tmp_is(tmp_path):
    check_secret_file(secret(folder(tmp_path, "sticky", 0o1777)), "[http] token_file")


@pytest.mark.unit
def test_any_folder_on_the_way_counts_not_only_the_files_own(tmp_path):
    open_above = folder(tmp_path, "open", 0o777)
    path = secret(folder(open_above, "private", 0o700))
    with pytest.raises(EndpointError, match=f"lies in {open_above}, which every user can change"):
        check_secret_file(path, "[http] token_file")


@pytest.mark.unit
def test_a_folder_of_another_user_is_refused(tmp_path):
    theirs = folder(tmp_path, "theirs", 0o755)
    path = secret(theirs)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(EndpointError, match=f"lies in {theirs}, which belongs to nobody \\(uid {NOBODY}\\)"):
        check_secret_file(path, "[http] token_file")


@pytest.mark.unit
def test_a_link_is_judged_by_where_it_leads(tmp_path):
    """A safe link to a file in an open folder is no safer than that file;
    a link to a safe file is as safe."""
    open_folder = folder(tmp_path, "open", 0o777)
    target = secret(open_folder)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(EndpointError, match=f"token_file {link} lies in {open_folder}"):
        check_secret_file(str(link), "[http] token_file")
    safe = tmp_path / "safe-link"
    safe.symlink_to(secret(tmp_path, "safe"))
    check_secret_file(str(safe), "[http] token_file")


@pytest.mark.unit
def test_what_is_not_a_readable_regular_file_is_refused(tmp_path):
    with pytest.raises(EndpointError, match="is not a regular file"):
        check_secret_file(str(folder(tmp_path, "a-folder", 0o700)), "[http] token_file")
    with pytest.raises(EndpointError, match="cannot read: No such file or directory"):
        check_secret_file(str(tmp_path / "missing"), "[http] token_file")


@pytest.mark.unit
def test_the_folder_of_allowed_client_keys_and_its_keys_must_be_ours_alone(tmp_path, caplog):
    keys = folder(tmp_path, "clients", 0o755)
    secret(keys, "alice.key", 0o644)  # public keys: anyone may read them
    secret(keys, "notes.txt", 0o666)  # not a key: never loaded, never judged
    with caplog.at_level(logging.WARNING, logger="gpuvisor"):
        check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    assert caplog.records == []
    bob = secret(keys, "bob.key", 0o664)
    with pytest.raises(EndpointError, match=f"curve_clients_dir: the file {bob} can be changed by the group"):
        check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    os.chmod(bob, 0o644)
    os.chown(bob, NOBODY, NOBODY)
    with pytest.raises(EndpointError, match=f"{bob} belongs to nobody"):
        check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    os.chown(bob, 0, 0)
    os.chmod(keys, 0o777)
    with pytest.raises(EndpointError, match=f"curve_clients_dir {keys} can be changed by every user"):
        check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    with pytest.raises(EndpointError, match="is not a folder"):
        check_trusted_folder(bob, "[daemon] curve_clients_dir")


def as_nobody(path: str) -> str:
    """``check_secret_file`` run by a daemon whose user is nobody (a forked
    child with that effective user and group: this interpreter lies where
    nobody may not run it), and what it said: its warnings, then its verdict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        said = []
        try:
            handler = logging.Handler()
            handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
            logging.getLogger("gpuvisor").addHandler(handler)
            os.setgroups([NOBODY])
            os.setegid(NOBODY)
            os.seteuid(NOBODY)
            try:
                check_secret_file(path, "[http] token_file")
                said.append("accepted")
            except EndpointError as exc:
                said.append(f"refused: {exc}")
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails
            said.append(f"the child failed: {exc!r}")
        finally:
            os.write(write_end, "\n".join(said).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        said = f.read().decode()
    os.waitpid(pid, 0)
    return said


@pytest.mark.process
def test_a_daemon_that_is_not_root_reads_roots_file_through_its_group_without_a_warning():
    """A Kubernetes Secret mounted with fsGroup: root's file, mode 0440, the
    daemon's group. Reading through the group is how it must be read; only
    a file every user can read is a leak."""
    place = tempfile.mkdtemp(prefix="gv-secret-")  # not under tmp_path, which nobody may not pass through
    try:
        os.chmod(place, 0o755)
        path = os.path.join(place, "tokens")
        with open(path, "w") as f:
            f.write(TOKEN)
        os.chown(path, 0, NOBODY)
        os.chmod(path, 0o440)
        assert as_nobody(path) == "accepted"
        os.chmod(path, 0o444)
        assert as_nobody(path) == (
            f"[http] token_file {path} can be read by every user (mode 0444); chmod go-r {path}\naccepted"
        )
        os.chown(path, 1234, NOBODY)
        assert as_nobody(path).startswith(
            f"refused: [http] token_file {path} belongs to uid 1234, not to this daemon's user "
            f"(nobody (uid {NOBODY})) or root: its owner could change it. Make it this daemon's: chown nobody {path}"
        )
    finally:
        for name in os.listdir(place):
            os.unlink(os.path.join(place, name))
        os.rmdir(place)


def _curve_files(tmp_path):
    from zmq.auth import create_certificates

    for name in ("server", "clients", "admins"):
        (tmp_path / name).mkdir(mode=0o700)
    _, server_secret = create_certificates(tmp_path / "server", "server")
    client_public, _ = create_certificates(tmp_path / "clients", "client")
    os.chmod(server_secret, 0o600)
    return server_secret, tmp_path / "clients", client_public


@pytest.mark.daemon
@pytest.mark.parametrize("what", ["secret_key_world_writable", "clients_dir_group_writable", "client_key_of_nobody",
                                  "admins_dir_world_writable"])  # fmt: skip
def test_curve_files_others_could_change_stop_the_daemon(daemon, tmp_path, what):
    """Whoever may change the CURVE files decides who gets in: such a file
    stops the daemon (exit 6) before it serves, naming the setting."""
    from tests.helpers.config import config_text
    from tests.helpers.daemon import free_port

    server_secret, clients, client_public = _curve_files(tmp_path)
    settings = {"curve_secret_key": str(server_secret), "curve_clients_dir": str(clients)}
    if what == "secret_key_world_writable":
        os.chmod(server_secret, 0o602)
        setting = "[daemon] curve_secret_key"
    elif what == "clients_dir_group_writable":
        os.chmod(clients, 0o770)
        setting = "[daemon] curve_clients_dir"
    elif what == "client_key_of_nobody":
        os.chown(client_public, NOBODY, NOBODY)
        setting = "[daemon] curve_clients_dir"
    else:
        admins = tmp_path / "admins"
        os.chmod(admins, 0o777)
        settings["curve_admins_dir"] = str(admins)
        setting = "[daemon] curve_admins_dir"
    d = daemon(config_text=config_text({"diag": DIAG}, daemon=settings), endpoint=f"tcp://127.0.0.1:{free_port()}",
               wait_ready=False)  # fmt: skip
    assert d.wait() == 6
    assert setting in d.output(), d.output()
