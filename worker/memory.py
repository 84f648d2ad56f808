"""torch's own memory figures, for READY and heartbeats.

Only read when torch is already imported and CUDA is initialised: a CPU
mode must not pay for importing torch, and asking an uninitialised CUDA for
figures would create a context (hundreds of MiB of VRAM) just to report zero.
The supervisor measures the process from outside with NVML; these figures
say how much of that the caching allocator holds and how much is in use.
"""

from __future__ import annotations

import sys


def torch_memory() -> dict | None:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return {
            "allocated_bytes": int(torch.cuda.memory_allocated()),
            "reserved_bytes": int(torch.cuda.memory_reserved()),
            "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        }
    except Exception:  # noqa: BLE001 - a figure is never worth a dead heartbeat thread
        return None


_OOM_WORDS = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """``MemoryError`` or torch's ``OutOfMemoryError`` (told apart by type
    name, so this never imports torch), anywhere in the exception's chain; or
    the RuntimeError older torch and cuBLAS raise with only words to go by."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        exc = link
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        if any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(exc).__mro__):
            return True
        if isinstance(exc, RuntimeError) and any(words in str(exc) for words in _OOM_WORDS):
            return True
        link = exc.__cause__ or exc.__context__
    return False
