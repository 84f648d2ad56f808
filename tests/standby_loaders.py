"""A heavy mode that can crash, for the standby tests: it imports a library
a warm standby preloads (safetensors: on the list, and light)."""

from __future__ import annotations

import os
import signal
import sys


def heavy_crashing() -> dict:
    import safetensors  # noqa: F401 - the import is what makes the mode heavy

    def crash(payload):
        print(payload["say"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    return {"crash": crash}
