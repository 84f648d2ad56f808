"""The test modes' loaders: ones that misbehave on purpose (the load-failure
tests), and small task tables the tests name in their configs as
``tests.helpers.loaders:NAME``. Imported only in worker processes (the tests
put the repository on PYTHONPATH)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time


def raises(**_: object) -> dict:
    raise RuntimeError("this loader fails on purpose")


def segfaults(**_: object) -> dict:
    ctypes.string_at(0)
    return {}


def exits(code: int = 9, **_: object) -> dict:
    os._exit(code)


def kills_itself(**_: object) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def says_then_exits(**_: object) -> dict:
    print("loader's last words: CUDA out of memory (pretend)", file=sys.stderr, flush=True)
    os._exit(9)


def hangs(seconds: float = 600, **_: object) -> dict:
    time.sleep(seconds)
    return {}


def not_a_mapping(**_: object) -> list:
    return ["echo"]


def tagged(tag: str = "x") -> dict:
    """A mode whose jobs say which mode ran them."""
    return {"tag": lambda payload: {"tag": tag, "pid": os.getpid()}}


def placed(tag: str) -> dict:
    """A mode for the placement tests: ``work`` sleeps ``payload`` seconds,
    then says which mode ran it, in which process, seeing which GPUs."""

    def work(payload: float) -> dict:
        time.sleep(payload or 0)
        return {"tag": tag, "pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    return {"work": work}


def tensors() -> dict:
    """Handlers that return torch tensors (contiguous, transposed, needing
    grad) and one whose dtype has no numpy twin."""
    import torch

    def make(payload):
        n = payload["n"]
        return {
            "float": torch.arange(n, dtype=torch.float32),
            "long_T": torch.arange(6).reshape(2, 3).T,
            "grad": torch.ones(2, requires_grad=True),
        }

    return {"make": make, "bfloat16": lambda payload: torch.zeros(2, dtype=torch.bfloat16)}


def streams() -> dict:
    """A generator handler whose first chunk msgpack cannot carry."""

    def unsendable(payload):
        yield "fine" if payload else object()

    def reuse(payload):
        """Refill one 4 MiB buffer before each yield: a common pattern, and
        a corrupted stream if chunks left the worker without a copy."""
        import numpy as np

        buf = np.empty(1 << 22, dtype=np.uint8)
        for i in range(payload["n"]):
            buf[:] = i
            yield buf

    return {"unsendable": unsendable, "reuse": reuse}


def warmable() -> dict:
    """A mode whose warm-up leaves a mark, so a test can see it ran, and in
    which worker."""
    state = {"warmed": False}

    def warm(path):
        time.sleep(0.2)
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        state["warmed"] = True

    return {"warm": warm, "was_warmed": lambda payload: state["warmed"]}


def preloads() -> dict:
    """A mode that imports a library a warm standby preloads (safetensors:
    on the list, and light), and says whether it was there before the load."""
    already = "safetensors" in sys.modules
    import safetensors  # noqa: F401 - the import is the point

    return {"was_preloaded": lambda payload: already, "pid": lambda payload: os.getpid()}


def marking(path: str) -> dict:
    """``mark`` appends its payload to ``path`` (so a test can count how many
    times a job really ran); ``oom`` runs out of memory for real."""

    def mark(payload):
        with open(path, "a") as f:
            f.write(f"{payload}\n")
        return payload

    return {"mark": mark, "oom": lambda payload: bytearray(1 << 62)}


def unsendable_results() -> dict:
    """Handlers whose results (or chunks) plain msgpack packs but the
    decoder cannot read back: a map with a tuple key, a list nested past
    the decoder's stack. Each must fail its own job, not the worker."""

    def too_deep(payload):
        value: list = []
        for _ in range(payload["levels"] - 1):
            value = [value]
        return value

    def tuple_key_chunk(payload):
        yield "fine"
        yield {(1, 2): "x"}
        yield "never sent"

    return {
        "tuple_key": lambda payload: {(1, 2): "x"},
        "nested_tuple_key": lambda payload: [{"a": {(1,): 2}}],
        "too_deep": too_deep,
        "tuple_key_chunk": tuple_key_chunk,
        "echo": lambda payload: payload,
        "pid": lambda payload: os.getpid(),
    }


def fails_while_file_exists(path: str) -> dict:
    """For the respawn tests: refuses to load while ``path`` exists."""
    if os.path.exists(path):
        raise RuntimeError(f"{path} exists, so this mode refuses to load")
    return {"pid": lambda payload: os.getpid(), "echo": lambda payload: payload}


def slow(seconds: float = 0.3) -> dict:
    """For the respawn tests: loads slowly enough to be killed while loading."""
    time.sleep(seconds)
    return {"pid": lambda payload: os.getpid(), "echo": lambda payload: payload}


def heavy_crashing() -> dict:
    """For the standby tests: a heavy mode (it imports a library a warm
    standby preloads: safetensors, on the list and light) that can crash."""
    import safetensors  # noqa: F401 - the import is what makes the mode heavy

    def crash(payload):
        print(payload["say"], file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    return {"crash": crash}


def sleeps_then_raises(seconds: float = 4.0, **_: object) -> dict:
    """For the flow-control tests: a mode whose load fails late, so every job
    queued for it meanwhile fails at once when it does, and their replies
    leave the daemon in one burst."""
    time.sleep(seconds)
    raise RuntimeError("this loader fails on purpose, late")


def vectors_and_words() -> dict:
    """For the CLI tests: an array result and a stream of text, without a model."""
    import numpy as np

    def vectors(payload):
        return np.linspace(-1, 1, 2 * 384, dtype=np.float32).reshape(2, 384)

    def words(payload):
        for word in payload:
            yield {"text": word}
        return {"words": len(payload)}

    return {"vectors": vectors, "words": words}
