"""Tie the worker's life to its supervisor's.

An orphaned worker would hold its VRAM until someone noticed, so the worker
dies with its parent by two independent means: the kernel's PR_SET_PDEATHSIG
(Linux; fires when the parent *thread* that forked us ends, which is why the
supervisor spawns from its long-lived loop thread), and a parent-pid check on
every heartbeat tick, which also covers the window before prctl ran and
systems without prctl.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
ORPHAN_EXIT_CODE = 70


def die_with_parent(parent_pid: int) -> None:
    """Arm PDEATHSIG, then exit at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the parent-pid check below and in the heartbeat still holds
    exit_if_orphaned(parent_pid)


def exit_if_orphaned(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        os._exit(ORPHAN_EXIT_CODE)
