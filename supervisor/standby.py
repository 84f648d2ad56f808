"""A warm standby: a spare worker process that has already imported the
heavy libraries (torch, transformers ...) but touched no GPU, ready to
become the next worker.

A respawn pays for a fresh interpreter and ``import torch, transformers``
(seconds) before the model even starts loading. With a standby, a switch
pays only for the kill, the reclaim and the model load. The standby holds
host RAM, never VRAM (importing torch does not initialise CUDA), and it is
started only after a mode has shown it needs those libraries (its READY
lists them), so a supervisor that only ever runs light modes never has one.

The standby reads the modules to import from a file descriptor (those an
earlier worker imported, in its order), then blocks on stdin;
``activate()`` writes it a generation and it connects like any worker. Closing stdin, or the supervisor's death
(PR_SET_PDEATHSIG, set before the imports), ends it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile

from supervisor.process import spawn_worker, standby_argv, stop_and_reap

log = logging.getLogger("gpuvisor")


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
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(f"{gen} {heartbeat_interval!r}\n".encode())
                self.proc.stdin.close()
                self._close_ready()
                return self.proc
            except (BrokenPipeError, OSError):
                pass
        log.warning("warm standby pid %d is gone (%s); starting a fresh worker", self.pid, self.proc.poll())
        self.stop()
        return None

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self._close_ready()
        stop_and_reap(self.proc, 1.0, kill_now=True)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def _close_ready(self) -> None:
        if self._ready_r >= 0:
            os.close(self._ready_r)
            self._ready_r = -1
