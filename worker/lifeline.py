"""Tie the worker's life to its supervisor's.

An orphaned worker would hold its VRAM until someone noticed, so the worker
dies with its supervisor by two independent means:

* the kernel's PR_SET_PDEATHSIG (Linux): SIGKILL when the parent *thread*
  that forked us ends, which is why the supervisor spawns from its
  long-lived loop thread;
* a check on every heartbeat tick, which also covers the window before
  prctl ran, systems without prctl, and a ``worker_command`` wrapper that
  does not exec (``sh -c``, ``conda run``): there our parent is the wrapper,
  so PDEATHSIG follows the wrapper, and the check looks at the supervisor's
  pid itself.

On finding itself orphaned, the worker kills its whole process group (the
supervisor gave it one of its own), so a wrapper or the worker's own
children go with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from protocol.messages import WorkerExit

PR_SET_PDEATHSIG = 1
ORPHAN_EXIT_CODE = WorkerExit.ORPHANED

_start_ppid: int | None = None
_own_group = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def die_with_parent(parent_pid: int) -> None:
    """Arm PDEATHSIG, note who our parent is, and exit at once if the
    supervisor is already gone."""
    global _start_ppid, _own_group
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the checks below and in the heartbeat still hold
    _start_ppid = os.getppid()
    try:
        # Only a group the supervisor made for us is ours to kill; a worker
        # started by hand shares its parent's group and must not take it down.
        _own_group = os.getpgrp() != os.getpgid(parent_pid)
    except OSError:
        _own_group = False
    exit_if_orphaned(parent_pid)


def orphaned(parent_pid: int) -> bool:
    ppid = os.getppid()
    if ppid == parent_pid:
        return False
    # Started through a wrapper: still under it, and the supervisor lives.
    return not (ppid == _start_ppid and _alive(parent_pid))


def exit_if_orphaned(parent_pid: int) -> None:
    if not orphaned(parent_pid):
        return
    if _own_group:
        os.killpg(0, signal.SIGKILL)  # us included
    os._exit(ORPHAN_EXIT_CODE)
