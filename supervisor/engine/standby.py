"""Warm standbys: a spare worker process that has already imported the
heavy libraries (torch, transformers ...) but touched no GPU, ready to
become the next worker; and the pool that decides when to keep one.

A respawn pays for a fresh interpreter and ``import torch, transformers``
(seconds) before the model even starts loading. With a standby, a switch
pays only for the kill, the reclaim and the model load. The standby holds
host RAM, never VRAM (importing torch does not initialise CUDA), and it is
started only after a mode has shown it needs those libraries (its READY
lists them), so a supervisor that only ever runs light modes never has one.
Only a mode seen to import them takes it: a light worker made from a spare
would carry hundreds of MB of imports it never uses.

The standby reads the modules to import from a file descriptor (those an
earlier worker imported, in its order), then blocks on stdin;
``activate()`` writes it a generation and it connects like any worker.
Closing stdin, or the supervisor's death (PR_SET_PDEATHSIG, set before the
imports), ends it. Stopping one never waits: it is killed, and reaped by a
later turn of the loop.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import tempfile

from supervisor.engine.process import describe_exit, signal_group, spawn_worker, standby_argv

log = logging.getLogger("gpuvisor")

_MODULE_NAME = re.compile(r"[A-Za-z_][\w.]{0,200}")  # what a standby may be asked to import


class Standby:
    def __init__(self, endpoint: str, preload: tuple[str, ...], device_env: dict[str, str]):
        self.preload = preload
        # The standby writes one byte here once its imports are done: a spare
        # still importing is no faster than a fresh process for a light mode.
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
        self._ready = False
        tops = sorted({name.partition(".")[0] for name in preload})
        log.info("warm standby pid %d preloading %d modules of %s", self.proc.pid, len(preload), ", ".join(tops))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        """Its preload is done (never blocks)."""
        if not self._ready:
            try:
                self._ready = bool(os.read(self._ready_r, 1))
            except BlockingIOError:
                pass
        return self._ready

    def activate(self, gen: int, heartbeat_interval: float) -> subprocess.Popen | None:
        """Hand the standby its generation; it becomes that worker. None if it
        died meanwhile (it is reaped, and the caller spawns a fresh one)."""
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
    """One slot's spare: what it should preload, which modes it suits, and
    the spares being stopped until they are reaped."""

    def __init__(self, endpoint: str, device_env: dict[str, str]):
        self._endpoint = endpoint
        self._device_env = device_env
        self.spare: Standby | None = None
        self.preload: tuple[str, ...] = ()  # heavy libraries modes were seen to import, in import order
        self._heavy: dict[str, bool] = {}  # mode -> it imported such libraries when it last loaded
        self._stopping: list[Standby] = []

    def learn(self, mode: str, imported: list | None) -> None:
        """A worker in ``mode`` said READY, listing what heavy libraries it
        imported."""
        self._heavy[mode] = bool(imported)
        if imported:
            names = (m for m in imported if isinstance(m, str) and _MODULE_NAME.fullmatch(m))
            self.preload = tuple(dict.fromkeys([*self.preload, *names]))  # import order kept, no repeats

    def take(self, mode: str) -> Standby | None:
        """The spare, if ``mode`` is known to need what it preloads (ready or
        still importing: it is ahead of a fresh process either way)."""
        if self.spare is None or not self._heavy.get(mode):
            return None
        spare, self.spare = self.spare, None
        return spare

    def prepare(self) -> None:
        """After a switch: a spare that preloads everything now known to be
        needed, replacing one that died or preloads less."""
        s = self.spare
        if s is not None and (s.proc.poll() is not None or set(self.preload) - set(s.preload)):
            self.stop()
        if self.spare is None and self.preload:
            try:
                self.spare = Standby(self._endpoint, self.preload, self._device_env)
            except Exception as exc:  # noqa: BLE001 - a spare is an optimisation: never worth the worker
                log.warning("could not start a warm standby: %s: %s", type(exc).__name__, exc)

    def check(self) -> None:
        """Now and then (on heartbeats): a spare that died idle is let go."""
        if self.spare is not None and self.spare.proc.poll() is not None:
            log.warning("warm standby pid %d died idle (%s); a new one comes after the next switch",
                        self.spare.pid, describe_exit(self.spare.proc.returncode))  # fmt: skip
            self.stop()

    def stop(self) -> None:
        if self.spare is not None:
            self.spare.kill()
            self._stopping.append(self.spare)
            self.spare = None

    def reap(self) -> None:
        """Reap the spares that have exited since they were stopped."""
        self._stopping = [s for s in self._stopping if not s.reaped()]

    @property
    def stopping(self) -> bool:
        return bool(self._stopping)

    def pace(self, worker_busy: bool, now: float) -> float | None:
        """Called every turn: whether the worker it stands behind is loading
        or running jobs now (a spare must not slow that worker down).
        Returns when it wants to be asked again, if it is waiting for a
        moment (None: at the next turn is soon enough)."""
        return None

    @property
    def pid(self) -> int | None:
        return self.spare.pid if self.spare is not None else None

    @property
    def ready(self) -> bool:
        return self.spare is not None and self.spare.ready()
