"""No worker outlives a program that forgot ``shutdown()``: the engines
still running are held here, strongly, and stopped without draining at
exit, as ``ProcessPoolExecutor`` joins its own."""

from __future__ import annotations

import atexit
import os

from supervisor.engine.commands import Shutdown
from supervisor.engine.loop import Engine

# Engines still running, held strongly: a Supervisor the program dropped
# without shutdown() still has a worker holding VRAM, and must be found here.
_LIVE_ENGINES: set[Engine] = set()


def post_stop(engine: Engine) -> Shutdown | None:
    """Ask the engine for a non-draining stop, without waiting. Safe from a
    finalizer, whatever thread runs it."""
    if engine.owner_pid != os.getpid() or not engine.alive:
        return None
    command = Shutdown(drain=False, timeout=None)
    engine.post(command)
    return command


def _stop_all_at_exit() -> None:
    """A program that forgot ``shutdown()`` must still not leave a worker
    behind: stop them without draining, as ProcessPoolExecutor joins its own."""
    pending = [(engine, post_stop(engine)) for engine in list(_LIVE_ENGINES)]
    for engine, command in pending:
        if command is not None:
            command.future.result(timeout=engine.config.stop_timeout * 2 + 10)
            engine.join(timeout=engine.config.stop_timeout * 2 + 10)


atexit.register(_stop_all_at_exit)
# A forked child has a copy of the parent's Supervisors but not their loop
# threads: it must neither use nor stop them (Engine.post refuses).
os.register_at_fork(after_in_child=_LIVE_ENGINES.clear)


def keep(engine: Engine) -> None:
    _LIVE_ENGINES.add(engine)


def forget(engine: Engine) -> None:
    _LIVE_ENGINES.discard(engine)
