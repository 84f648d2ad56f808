"""Warm standbys: a spare worker process that has already imported the
heavy libraries (torch, transformers, the model classes ...) but touched no
GPU, ready to become the next worker; and the pool that decides when to
keep one and when it may run.

A respawn pays for a fresh interpreter and ``import torch, transformers``
(seconds) before the model even starts loading. With a standby, a switch
pays only for the kill, the reclaim and the model load. The standby holds
host RAM, never VRAM (importing torch does not initialise CUDA). What it
imports: the modes' ``preload`` lists from the config, then what workers
reported in READY, remembered across restarts in the state directory
(``engine.learned``). With either, a spare starts with the supervisor;
without, once a mode has shown it needs those libraries, so a supervisor
that only ever runs light modes never has one. Only a mode with a preload
or seen to import them takes it: a light worker made from a spare would
carry hundreds of MB of imports it never uses.

A spare never competes with the worker it stands behind. Its imports are
seconds of CPU. They run in a thread under ``SCHED_IDLE``, the lowest CPU
priority the kernel offers (``worker/standby.py``), which takes no CPU
time from any other thread: beside a light worker (a mode that takes no
spare) a spare imports freely. That is not enough beside a torch worker:
the policy decides which thread gets a CPU, not what the CPUs share, and
on a 2-core machine an importer at ``SCHED_IDLE`` still made a worker's
embedding jobs 2.6 times slower (5.6 times at the normal priority; torch's
threads wait for each other when one of them is slowed). So while a heavy
worker (one of a mode that takes the spare) loads or runs jobs, and for
``RESUME_AFTER_IDLE_S`` after, a spare still importing is stopped
(SIGSTOP to its process group), and the next spare starts only once that
worker has been idle that long; unless a switch that takes the spare is
coming (jobs wait for such a mode): then it runs. A spare done importing
waits on a read and costs nothing.

Under steady load a heavy mode's jobs come back about every ``max_wait_s``
plus a switch (3.7 s at the default 3 s), and the spare taken by one visit
would have only that time, beside the light worker, to be ready for the
next: less than its imports take on a small machine (3 to 4.5 s of CPU
here). So while jobs wait for a mode that will take the spare, its
successor starts (``pace()``) and imports beside the light worker too; it
is the spare once that switch has taken the first, and has had
``max_wait_s`` more. Two spares hold twice the host RAM meanwhile. A
successor also starts when a worker's READY teaches modules the spare does
not preload; the spare gives way to it once it is ready.

The standby reads the modules to import from a file descriptor, then
blocks on stdin; ``activate()`` writes it a generation and it connects like
any worker. Closing stdin, or the supervisor's death (PR_SET_PDEATHSIG, set
before the imports, and delivered to a stopped process too), ends it.
Stopping one never waits: it is killed, and reaped by a later turn of the
loop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

from supervisor.config import Config
from supervisor.engine import learned
from supervisor.engine.process import describe_exit, signal_group, spawn_worker, standby_argv

log = logging.getLogger("gpuvisor")

# How long the worker must have been idle before a stopped spare goes on
# importing. A caller that sends its next job when the last one answers
# leaves the worker idle for about a round trip (under a millisecond), and
# the pump hands a queued job over in the same turn, so such gaps never
# wake the spare; a pause longer than this is the caller's own, and the
# spare may use it. Short, so a spare loses little time to a worker that
# has gone quiet.
RESUME_AFTER_IDLE_S = 0.2
# A spare is stopped only once it dies with the supervisor (PDEATHSIG armed,
# some 50 ms after its start); until then it is looked at this often.
ARMING_POLL_S = 0.01


class Standby:
    def __init__(self, endpoint: str, preload: tuple[str, ...], device_env: dict[str, str]):
        self.preload = preload
        # The standby writes one byte here once it dies with the supervisor
        # (before that, a stopped spare would outlive it), and one once its
        # imports are done (a spare still importing is no faster than a fresh
        # process for a light mode).
        self.behind = False  # it preloads less than has since become known to be needed
        self._ready_r, ready_w = os.pipe()
        os.set_blocking(self._ready_r, False)
        # The module list (tens of KB) goes in an unlinked temporary file, not
        # down a pipe: a pipe write past 64 KiB would block the loop until the
        # child reads it.
        with tempfile.TemporaryFile() as names:
            names.write(",".join(preload).encode())
            names.flush()
            names.seek(0)
            try:
                argv = [*standby_argv(endpoint), "--ready-fd", str(ready_w), "--preload-fd", str(names.fileno())]
                self.proc = spawn_worker(argv, device_env, stdin=subprocess.PIPE, pass_fds=(ready_w, names.fileno()))
            except BaseException:
                os.close(self._ready_r)
                raise
            finally:
                os.close(ready_w)
        self._told = 0  # bytes read from it: 1 armed, 2 ready
        self.paused = False  # stopped (SIGSTOP) so as not to slow the worker down
        tops = sorted({name.partition(".")[0] for name in preload})
        log.info("warm standby pid %d preloading %d modules of %s", self.proc.pid, len(preload), ", ".join(tops))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _listen(self) -> int:
        """What it has told so far (never blocks)."""
        if self._told < 2 and self._ready_r >= 0:
            try:
                got = os.read(self._ready_r, 2)
            except BlockingIOError:
                return self._told
            if got:
                self._told += len(got)
            else:  # it died (or closed the pipe): it tells nothing more
                self._close_ready()
        return self._told

    def ready(self) -> bool:
        """Its preload is done."""
        return self._listen() >= 2

    def stoppable(self) -> bool:
        """It dies with the supervisor even while stopped (PDEATHSIG armed)."""
        return self._listen() >= 1

    def pause(self) -> None:
        if not self.paused:
            signal_group(self.proc, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            signal_group(self.proc, signal.SIGCONT)
            self.paused = False

    def activate(self, gen: int, heartbeat_interval: float) -> subprocess.Popen | None:
        """Hand the standby its generation; it becomes that worker (and runs:
        one stopped mid-import goes on). None if it died meanwhile (it is
        reaped, and the caller spawns a fresh one)."""
        self.resume()
        stdin = self.proc.stdin
        if self.proc.poll() is None and stdin is not None:
            try:
                stdin.write(f"{gen} {heartbeat_interval!r}\n".encode())
                stdin.close()
                self._close_ready()
                return self.proc
            except (BrokenPipeError, OSError):
                pass
        log.warning("warm standby pid %d is gone (%s); starting a fresh worker", self.pid, self.proc.poll())
        self.kill()
        return None

    def kill(self) -> None:
        """End it without waiting: closing stdin ends a waiting spare, SIGKILL
        one still importing; ``reaped()`` collects it later."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        self._close_ready()
        signal_group(self.proc, signal.SIGKILL)
        self.resume()  # SIGKILL ends a stopped process too; this only keeps the record true

    def reaped(self) -> bool:
        if self.proc.poll() is None:
            return False
        signal_group(self.proc, signal.SIGKILL)  # grandchildren left in the group
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return True

    def _close_ready(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1


class StandbyPool:
    """One device's spare (and its successor while a switch that takes it is
    coming): what they preload, which modes they suit, when they may run,
    and the spares being stopped until they are reaped.

    ``wanted``: start a spare now if there is anything to preload (the
    configured lists, or what the state directory remembers)."""

    def __init__(
        self,
        endpoint: str,
        device_env: dict[str, str],
        config: Config,
        *,
        wanted: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._endpoint = endpoint
        self._clock = clock
        self._device_env = device_env
        self.spare: Standby | None = None
        self._successor: Standby | None = None  # the next spare, started before a switch takes this one
        self._folder = learned.state_directory(config.state_dir)
        self._learned = learned.read(self._folder)
        self._configured: tuple[str, ...] = ()
        self._declared: frozenset[str] = frozenset()  # modes with a preload in the config: heavy from the start
        self.preload: tuple[str, ...] = ()
        self.reconfigure(config)
        self._stopping: list[Standby] = []
        self._busy_at = float("-inf")  # when a heavy worker was last known to be loading or running jobs
        self._was_busy = False
        self._wanted = False  # a spare is to be started (once the worker is idle): prepare() until stop()
        if wanted:
            self.prepare()

    def reconfigure(self, config: Config) -> None:
        """The modes' ``preload`` lists (at start, and after a reload)."""
        self._configured = tuple(dict.fromkeys(m for spec in config.modes.values() for m in spec.preload))
        self._declared = frozenset(name for name, spec in config.modes.items() if spec.preload)
        self._merge()

    def _merge(self) -> None:
        """What a spare preloads: the configured modules first, in config
        order, then those workers were seen to import, in their import
        order; no repeats."""
        self.preload = tuple(dict.fromkeys([*self._configured, *self._learned.preload]))
        for s in (self.spare, self._successor):
            if s is not None and set(self.preload) - set(s.preload):
                s.behind = True

    def heavy(self, mode: str) -> bool:
        return mode in self._declared or self._learned.heavy.get(mode, False)

    def learn(self, mode: str, imported: list | None) -> None:
        """A worker in ``mode`` said READY, listing what heavy libraries it
        imported; remembered in the state directory when that is news."""
        names = tuple(m for m in imported or () if isinstance(m, str) and learned.MODULE_NAME.fullmatch(m))
        grown = tuple(dict.fromkeys([*self._learned.preload, *names]))  # import order kept, no repeats
        if grown == self._learned.preload and self._learned.heavy.get(mode) == bool(names):
            return
        self._learned.preload = grown
        self._learned.heavy[mode] = bool(names)
        self._merge()
        learned.write(self._folder, self._learned)

    def take(self, mode: str) -> Standby | None:
        """The spare, if ``mode`` is known to need what it preloads (ready or
        still importing, stopped or not: it is ahead of a fresh process
        either way, and ``activate()`` lets it run); its successor, if any,
        is the spare from now on."""
        if self.spare is None or not self.heavy(mode):
            return None
        spare, self.spare, self._successor = self.spare, self._successor, None
        return spare

    def prepare(self) -> None:
        """At start and after a switch: a spare, replacing one that died. It
        starts now unless a heavy worker has been busy within
        ``RESUME_AFTER_IDLE_S`` (at start there is none), else once it has
        been idle that long (``pace()``): even the spare's interpreter
        start-up would slow the first jobs of a torch worker that has just
        loaded. A spare that preloads less than is now known to be needed
        (a worker's READY taught more) is kept until a successor that
        preloads everything is ready (``pace()``): killed at once, it would
        leave a heavy switch meanwhile a spare seconds behind it, or none."""
        if self._successor is not None and self._successor.proc.poll() is not None:
            self._drop(self._successor)
            self._successor = None
        if self.spare is not None and self.spare.proc.poll() is not None:
            self._drop(self.spare)
            self.spare, self._successor = self._successor, None
        self._wanted = bool(self.preload) and self.spare is None
        if not self._was_busy and self._clock() >= self._busy_at + RESUME_AFTER_IDLE_S:
            self._start()

    def _start(self) -> None:
        self._wanted = False
        if self.spare is None:
            self.spare = self._new()

    def _new(self) -> Standby | None:
        if not self.preload:
            return None
        try:
            return Standby(self._endpoint, self.preload, self._device_env)
        except Exception as exc:  # noqa: BLE001 - a spare is an optimisation: never worth the worker
            log.warning("could not start a warm standby: %s: %s", type(exc).__name__, exc)
            return None

    def _drop(self, s: Standby) -> None:
        s.kill()
        self._stopping.append(s)

    def check(self) -> None:
        """Now and then (on heartbeats): a spare that died idle is let go."""
        for s in (self.spare, self._successor):
            if s is not None and s.proc.poll() is not None:
                log.warning(
                    "warm standby pid %d died idle (%s); a new one comes after the next switch",
                    s.pid,
                    describe_exit(s.proc.returncode),
                )
                self.stop()
                return

    def stop(self) -> None:
        """No spare until the next ``prepare()``; those there are killed."""
        self._wanted = False
        for s in (self.spare, self._successor):
            if s is not None:
                self._drop(s)
        self.spare = self._successor = None

    def reap(self) -> None:
        """Reap the spares that have exited since they were stopped."""
        self._stopping = [s for s in self._stopping if not s.reaped()]

    @property
    def stopping(self) -> bool:
        return bool(self._stopping)

    def pace(self, heavy_busy: bool, now: float, coming: bool = False) -> float | None:
        """Called every turn: whether a heavy worker is loading or running
        jobs now, and whether a switch that takes the spare is ``coming``.
        A spare still importing is stopped while such a worker is busy, and
        until it has been idle for ``RESUME_AFTER_IDLE_S``; then it goes on
        (and a spare wanted but not yet started starts); unless the switch
        that takes it is coming. Then too its successor starts (paced like
        any spare: the coming switch does not take it), and when the spare
        preloads less than is now known to be needed; such a spare gives way
        to its successor once that is ready.
        Returns when it wants to be asked again, if it is waiting for that
        moment (None: at the next turn is soon enough). Cheap on the busy
        path: once stopped, a spare is not looked at again until the worker
        is idle. A spare is stopped only once it has said that it dies with
        the supervisor: a process stopped before it armed PDEATHSIG would
        outlive a supervisor killed meanwhile, stopped for good."""
        if heavy_busy or self._was_busy:  # busy until this turn at least: the loop may not turn for a second
            self._busy_at = now
        self._was_busy = heavy_busy
        resume_at = self._busy_at + RESUME_AFTER_IDLE_S
        idle_enough = now >= resume_at
        if self._wanted and (idle_enough or coming):
            self._start()
        spare = self.spare
        if spare is not None and self._successor is None and idle_enough and (coming or spare.behind):
            self._successor = self._new()
        if spare is not None and spare.behind and self._successor is not None and self._successor.ready():
            self._drop(spare)
            spare, self.spare, self._successor = self._successor, self._successor, None
        wake: float | None = None if heavy_busy else resume_at
        for s, may_run in ((spare, coming or idle_enough), (self._successor, idle_enough)):
            if s is None:
                continue
            if may_run or not (s.paused or not s.ready()):
                s.resume()
            elif not s.stoppable():  # its first moments, before it dies with the supervisor
                if s.proc.poll() is None:
                    wake = now + ARMING_POLL_S
            else:
                s.pause()
        if idle_enough or (spare is None and not self._wanted):
            return None
        return wake

    @property
    def pid(self) -> int | None:
        return self.spare.pid if self.spare is not None else None

    @property
    def ready(self) -> bool:
        return self.spare is not None and self.spare.ready()

    @property
    def paused(self) -> bool:
        return self.spare is not None and self.spare.paused
