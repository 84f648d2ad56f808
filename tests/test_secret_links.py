"""A secret reached through a symbolic link is only as safe as the link: its
owner may point it anywhere, and the sticky bit of ``/tmp`` does not stop
them. So every link on the way to a file that decides who gets in (the path
given, and each link met while resolving it) must be the daemon's user's or
root's, or the daemon refuses it (exit 6 at start; at SIGHUP it keeps what
it had), naming the link.

The tests run as root; "another user" is nobody (uid 65534), made the
owner of a link with ``os.lchown``."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from supervisor.service.front import EndpointError
from supervisor.service.secret_files import check_secret_file, check_trusted_folder
from tests.helpers import T, wait_until
from tests.helpers.config import DIAG
from tests.test_http import curl, http_config, http_socket
from tests.test_secret_files import NOBODY, folder, secret

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes links of another user: needs root")


def link(path, target, owner: int = 0) -> str:
    os.symlink(target, path)
    os.lchown(path, owner, owner)
    return str(path)


@pytest.mark.daemon
def test_a_token_file_that_is_another_users_link_in_a_sticky_folder_stops_the_daemon(daemon, tmp_path):
    """The review's case: ``token_file`` named nobody's link in ``/tmp``,
    which nobody re-pointed at a file of root's, and that file's line became
    a valid token."""
    tokens = secret(tmp_path)  # root's, 0600, in root's folder: safe in itself
    toklink = link(folder(tmp_path, "tmp", 0o1777) / "toklink", tokens, owner=NOBODY)
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": toklink}), wait_ready=False)
    assert d.wait() == 6
    out = d.output()
    assert f"[http] token_file {toklink} is a link which belongs to nobody (uid {NOBODY}), not to root" in out, out
    assert "its owner could point it at another file" in out


@pytest.mark.daemon
def test_a_link_of_another_user_replacing_roots_is_refused_at_sighup_and_the_old_tokens_stay(daemon, tmp_path):
    """Root's link passes; once the name is nobody's link (in a sticky
    folder anyone may make a free name theirs), SIGHUP refuses it: the
    token it leads to never gets in, the old one still does."""
    old, other = secret(tmp_path, "old", text="the-old-token-0123456789\n"), secret(tmp_path, "other")
    toklink = link(folder(tmp_path, "tmp", 0o1777) / "toklink", old)
    d = daemon(config_text=http_config({"diag": DIAG}, {}, http={"token_file": toklink}))
    unix = http_socket(d)
    assert curl("http://gpuvisor/v1/models", unix=unix, token="the-old-token-0123456789")[0] == 200
    os.unlink(toklink)
    link(toklink, other, owner=NOBODY)
    after = len(d.notes)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_note("READY=1", after=after)
    wait_until(lambda: f"{toklink} is a link which belongs to nobody" in d.output(), T, "the refusal in the log")
    assert "reload: the HTTP listener keeps its settings" in d.output()
    assert curl("http://gpuvisor/v1/models", unix=unix, token="a-token-of-sixteen-or-more")[0] == 401
    assert curl("http://gpuvisor/v1/models", unix=unix, token="the-old-token-0123456789")[0] == 200


@pytest.mark.unit
def test_another_users_link_anywhere_on_the_way_is_refused_naming_it(tmp_path):
    private = folder(tmp_path, "private", 0o700)
    secret(private)
    sticky = folder(tmp_path, "sticky", 0o1777)
    theirs = link(sticky / "theirs", private, owner=NOBODY)
    ours = link(tmp_path / "ours", "sticky/theirs/tokens")  # root's link, relative, leading through theirs
    for path in (f"{theirs}/tokens", ours):
        with pytest.raises(EndpointError) as refused:
            check_secret_file(path, "[http] token_file")
        assert f"[http] token_file {path} goes through the link {theirs}, which belongs to nobody" in str(refused.value)


@pytest.mark.unit
def test_links_of_root_are_followed_as_the_kernel_follows_them_and_pass(tmp_path, caplog):
    """Relative targets, ``..`` after a link, a chain: all root's, all in
    root's folders, to a private file: no word said."""
    deep = folder(folder(tmp_path, "a", 0o755), "b", 0o700)
    secret(deep)
    link(tmp_path / "to-b", "a/b")
    link(tmp_path / "a" / "up", "..")
    chained = link(tmp_path / "chained", str(tmp_path / "a" / "up" / "to-b" / "tokens"))
    with caplog.at_level(logging.WARNING, logger="gpuvisor"):
        check_secret_file(chained, "[http] token_file")
        check_secret_file(str(tmp_path / "to-b" / ".." / "b" / "tokens"), "[http] token_file")
    assert caplog.records == []


@pytest.mark.unit
def test_a_link_through_an_open_folder_is_refused_even_if_its_target_is_safe(tmp_path):
    """Whoever may change the folder a link lies in may put another link in
    its place (no sticky bit)."""
    target = secret(tmp_path)
    shared = folder(tmp_path, "shared", 0o777)
    via = link(shared / "tokens", target)
    with pytest.raises(EndpointError, match=f"token_file {via} lies in {shared}, which every user can change"):
        check_secret_file(via, "[http] token_file")


@pytest.mark.unit
def test_a_client_key_that_is_another_users_link_is_refused(tmp_path):
    keys = folder(tmp_path, "clients", 0o755)
    real = secret(folder(tmp_path, "elsewhere", 0o755), "alice.key", 0o644)
    link(keys / "alice.key", real)
    check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    bob = link(keys / "bob.key", real, owner=NOBODY)
    with pytest.raises(EndpointError, match=f"curve_clients_dir: the file {bob} is a link which belongs to nobody"):
        check_trusted_folder(str(keys), "[daemon] curve_clients_dir")
    os.unlink(bob)
    clients = link(tmp_path / "clients-link", keys, owner=NOBODY)
    with pytest.raises(EndpointError, match=f"curve_clients_dir {clients} is a link which belongs to nobody"):
        check_trusted_folder(clients, "[daemon] curve_clients_dir")
