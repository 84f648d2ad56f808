"""Files that decide who gets in: the rule every one of them passes before
the daemon trusts it.

Whoever can change such a file can let themselves in (a bearer token
added, a CURVE client key dropped into the folder of allowed ones, the
daemon's own secret key replaced). So a file is refused when anyone but the
daemon's user and root could change it: it is writable by its group or by
every user, it belongs to another user, or a folder on its way from ``/``
could be changed by someone else (writable by others without the sticky
bit, or owned by another user), who could then put another file in its
place, or a symbolic link on its way belongs to another user, who could
point it elsewhere (a link in ``/tmp``, whose sticky bit stops others from
replacing the link but not its owner from re-pointing it). That is
OpenSSH's rule for what it trusts (``StrictModes``), applied to every link
and every folder the path goes through, as the kernel resolves it. A
secret that others can only read is said in the log, not refused: a leak to
fix, but no way in for a stranger.

A refusal is an ``EndpointError``, which stops the daemon (exit 6) before
any worker starts; its message names the file and the command that fixes it.
"""

from __future__ import annotations

import fnmatch
import grp
import logging
import os
import pwd
import stat

from supervisor.service.front import EndpointError

log = logging.getLogger("gpuvisor")


def check_secret_file(path: str, setting: str) -> None:
    """Refuse the file at ``path`` when anyone but this daemon's user or root
    could change it or a folder above it; log a warning when others can read
    it. For a file whose content is a secret: ``[http] token_file``,
    ``[daemon] curve_secret_key``. ``setting`` names it in the messages.
    Call it before the file is read, so a refused file is never used."""
    _, st = _held_by_us(path, setting, stat.S_ISREG, "a regular file")
    _warn_if_others_can_read(st, path, setting)


def check_trusted_folder(path: str, setting: str, pattern: str = "*.key") -> None:
    """Refuse the folder at ``path`` when anyone but this daemon's user or
    root could change it, a folder above it, or a file in it that matches
    ``pattern``. For a folder whose files say who may come in:
    ``[daemon] curve_clients_dir`` (the allowed clients' public keys, which
    anyone may read: only writing them is refused)."""
    real, _ = _held_by_us(path, setting, stat.S_ISDIR, "a folder")
    for name in sorted(os.listdir(real)):
        if fnmatch.fnmatch(name, pattern):
            _held_by_us(os.path.join(real, name), f"{setting}: the file")  # a key may be a link too


def _held_by_us(path: str, setting: str, is_kind=None, kind: str = "") -> tuple[str, os.stat_result]:
    """``path``'s real path and status, refused unless it is of the ``kind``
    ``is_kind`` accepts and nobody but this daemon's user and root could
    change it, a link on its way, or a folder it goes through."""
    real, folders = _resolve(path, setting)
    st = _stat(real, path, setting)
    if is_kind is not None and not is_kind(st.st_mode):
        raise EndpointError(f"{setting} {path} is not {kind}")
    _refuse_if_others_can_change(real, st, path, setting)
    _refuse_if_a_folder_is_open(folders, path, setting)
    return real, st


def _stat(real: str, path: str, setting: str) -> os.stat_result:
    try:
        return os.stat(real)
    except OSError as exc:
        raise EndpointError(f"{setting} {path}: cannot read: {exc.strerror or exc}") from None


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _trusted() -> str:
    return "root" if os.geteuid() == 0 else f"this daemon's user ({_user(os.geteuid())}) or root"


def _refuse_if_others_can_change(real: str, st: os.stat_result, path: str, setting: str) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not _trusted_owner(st.st_uid):
        raise EndpointError(
            f"{setting} {path} belongs to {_user(st.st_uid)}, not to {_trusted()}: its owner could change it. "
            f"Make it this daemon's: chown {_name(os.geteuid())} {real}"
        )
    if mode & 0o022:
        who = "every user" if mode & 0o002 else f"the group {_group(st.st_gid)}"
        raise EndpointError(
            f"{setting} {path} can be changed by {who} (mode {mode:04o}), so they could let themselves in. "
            f"Make it writable by its owner alone: chmod go-w {real}"
        )


_MAX_LINKS = 40  # as the kernel's ELOOP


def _resolve(path: str, setting: str) -> tuple[str, list[str]]:
    """``path`` with its links resolved, as the kernel resolves it, one name
    at a time from ``/`` (a relative path from the working folder), and the
    folders it went through, links' folders included. A link that someone
    else owns is refused here: they could point it at another file. A name
    that is not there ends the walk: the caller's stat says so."""
    pending = [name for name in reversed(_absolute(path).split("/")) if name]
    here, links, folders = "/", 0, ["/"]
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            here = os.path.dirname(here)
            continue
        step = os.path.join(here, name)
        try:
            st = os.lstat(step)
        except OSError:
            return os.path.join(step, *reversed(pending)), folders
        if stat.S_ISLNK(st.st_mode):
            _refuse_if_others_own_the_link(step, st, path, setting)
            links += 1
            if links > _MAX_LINKS:
                raise EndpointError(f"{setting} {path}: cannot read: more than {_MAX_LINKS} links on its way")
            target = os.readlink(step)
            if target.startswith("/"):
                here = "/"
            pending.extend(name for name in reversed(target.split("/")) if name)
            continue
        here = step
        if pending and stat.S_ISDIR(st.st_mode) and here not in folders:
            folders.append(here)
    return here, folders


def _refuse_if_others_own_the_link(link: str, st: os.stat_result, path: str, setting: str) -> None:
    """Whoever owns a link may point it anywhere, whatever the folder it
    lies in; the sticky bit only stops them from replacing ours."""
    if _trusted_owner(st.st_uid):
        return
    where = "is a link" if link == os.path.normpath(_absolute(path)) else f"goes through the link {link},"
    raise EndpointError(
        f"{setting} {path} {where} which belongs to {_user(st.st_uid)}, not to {_trusted()}: its owner could "
        f"point it at another file. Name the file by a path without that link, or replace the link with one of "
        f"{_name(os.geteuid())}'s"
    )


def _absolute(path: str) -> str:
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def _refuse_if_a_folder_is_open(folders: list[str], path: str, setting: str) -> None:
    """Whoever may change a folder on the way may put another file, another
    folder or another link in place of ours; the sticky bit (``/tmp``) stops
    that for names they do not own. The folders nearest the file first."""
    for folder in reversed(folders):
        st = os.stat(folder)
        mode = stat.S_IMODE(st.st_mode)
        if not _trusted_owner(st.st_uid):
            raise EndpointError(
                f"{setting} {path} lies in {folder}, which belongs to {_user(st.st_uid)}: its owner could put "
                f"another file in its place. Keep it in a folder of {_trusted()}"
            )
        if mode & 0o022 and not mode & stat.S_ISVTX:
            who = "every user" if mode & 0o002 else f"the group {_group(st.st_gid)}"
            raise EndpointError(
                f"{setting} {path} lies in {folder}, which {who} can change (mode {mode:04o}, no sticky bit): "
                f"they could put another file in its place. chmod go-w {folder}, or keep the file elsewhere"
            )


def _warn_if_others_can_read(st: os.stat_result, path: str, setting: str) -> None:
    """Group read is no leak when it is how this daemon itself reads a file
    that root owns (mode 0640, the daemon's group: what a Kubernetes Secret
    mounted with ``fsGroup`` looks like)."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IROTH:
        who = "every user"
    elif mode & stat.S_IRGRP and not (st.st_uid != os.geteuid() and st.st_gid in {os.getegid(), *os.getgroups()}):
        who = f"the group {_group(st.st_gid)}"
    else:
        return
    log.warning("%s %s can be read by %s (mode %04o); chmod go-r %s", setting, path, who, mode, path)


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user(uid: int) -> str:
    name = _name(uid)
    return f"uid {uid}" if name == str(uid) else f"{name} (uid {uid})"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
