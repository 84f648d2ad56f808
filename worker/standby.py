"""A warm standby's imports, at the lowest CPU priority the kernel offers.

A spare imports seconds' worth of modules (torch, transformers, the model
classes) while the worker it stands behind serves. They run in a thread of
their own under ``SCHED_IDLE``: the kernel gives that thread a core only
when no other thread on the machine wants one, so the imports take no CPU
time from the worker (or from anything else), and run at full speed on
whatever it leaves idle. That lets a spare import beside a busy light
worker, and be ready when a switch comes under steady load. (It does not
stop what the cores share, caches and the memory bus, from slowing a torch
worker: beside one that is busy the supervisor still stops the spare, see
``supervisor/engine/standby.py``.)

Why a thread and not the process: the main thread becomes the worker and
must run its jobs at the normal policy, and Linux lets an unprivileged
thread enter ``SCHED_IDLE`` but not leave it (that takes CAP_SYS_NICE, or
an ``RLIMIT_NICE`` of 20). The policy is per thread, so the main thread
keeps the normal one. Threads made while importing inherit the importer's
policy: OpenBLAS starts its pool when numpy or scipy load. When the spare
is taken, ``restore_normal_policy()`` sets every such thread back where the
kernel allows it; elsewhere they keep it, which costs only while every core
is busy with other work (a BLAS call then waits for them).

A spare taken mid-import stops after the module under way, and the main
thread waits for that one: two threads importing one package at once can
each see the other's half-made modules. The wait is at the normal priority
where the kernel lets the importer leave ``SCHED_IDLE``. Where it does not,
the wait has no bound: while the machine is busy such a thread gets no CPU
at all (measured: an ``import torch`` that takes 1.7 s alone was still not
done after 60 s beside two busy loops on 2 cores). The spare then becomes
a fresh worker instead (``Importer.stop()`` says so): a cold start at the
normal priority, no worse than having had no spare.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Sequence

IMPORTER_NAME = "gv-spare-import"
"""The importing thread's name in ``/proc`` (``ps -L``, ``top -H``): which
thread of a spare is at the lowest priority."""


def _name_this_thread() -> None:
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as comm:
            comm.write(IMPORTER_NAME)
    except OSError:
        pass  # only a name


def _lowest_priority() -> None:
    """This thread (and the threads it starts) to ``SCHED_IDLE``. Where the
    kernel refuses (a seccomp profile that forbids it, say), the imports run
    at the normal priority: slower jobs beside them, never a broken spare."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        pass


def _to_normal(tid: int) -> bool:
    """Thread ``tid`` of this process at the normal policy (moved there from
    ``SCHED_IDLE`` if need be); False where the kernel refuses."""
    try:
        if os.sched_getscheduler(tid) == os.SCHED_IDLE:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except ProcessLookupError:  # it has ended: nothing left at the lowest priority
        return True
    except OSError:
        return False
    return True


def restore_normal_policy() -> None:
    """Every thread of this process left under ``SCHED_IDLE`` back to the
    normal policy, where the kernel allows it (see the module docstring)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tids:
        _to_normal(int(tid))


class Importer(threading.Thread):
    """Imports ``names`` in order at the lowest priority, then
    ``worker.runtime`` (what every worker imports next), then calls
    ``done``; unless ``stop()`` came first."""

    def __init__(self, names: Sequence[str], done: Callable[[], None]):
        # A daemon: a spare that is not needed exits at once, mid-import.
        super().__init__(name="gpuvisor-spare-imports", daemon=True)
        self._names, self._done = names, done
        self._stopping = threading.Event()
        self._importing = True  # written by this thread alone

    def run(self) -> None:
        _name_this_thread()
        _lowest_priority()
        try:
            for name in self._names:
                if self._stopping.is_set():
                    return
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - a failed preload only costs the speed-up
                    pass
            if self._stopping.is_set():
                return
            import worker.runtime  # noqa: F401 - ready before its generation comes
        finally:
            self._importing = False
        self._done()

    def stop(self) -> bool:
        """No more imports; the one under way is waited for. False, without
        waiting, if it is under way and the kernel keeps it at the lowest
        priority: the caller starts afresh instead."""
        self._stopping.set()
        tid = self.native_id
        if self._importing and tid is not None and not _to_normal(tid):
            return False
        self.join()
        restore_normal_policy()
        return True
