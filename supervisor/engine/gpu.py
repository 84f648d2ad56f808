"""VRAM accounting through NVML, never torch: the device's memory, what
each process holds, and whether a stopped worker's memory is back.

The supervisor must not hold a CUDA context (that is the whole design), so
everything here reads the driver through NVML (``nvidia-ml-py``, module
``pynvml``), which needs no context and takes no VRAM. pynvml is imported
inside the functions that use it: importing this module imports neither
pynvml nor numpy nor torch.

Nothing here raises for an NVML failure. A missing driver, a library that
is too old, a GPU that fell off the bus: each becomes a reason string (or
None, with the reason in ``GpuMeter.last_error``), because the supervisor's
loop must outlive its GPU.

NVML semantics this module relies on (what the numbers mean):

* Device "used" comes from ``nvmlDeviceGetMemoryInfo_v2`` where the driver
  has it (R510 and later), else the v1 call. The two differ: v1 "used" is
  total - free and so includes memory the driver and firmware reserve
  (hundreds of MiB on an idle A100); v2 reports that as ``reserved`` and,
  on current drivers, leaves it out of "used" (what ``nvidia-smi`` shows).
  A meter picks one version when it opens and keeps it, so a baseline and
  a later reading are always comparable.
* A process's bytes come from the running-process lists (compute, graphics
  and MPS, ``_v3`` calls, falling back to ``_v2`` on drivers without them).
  The unversioned pynvml wrappers are not used: on a driver without the
  ``_v3`` symbol they raise ``NVMLLibraryMismatchError``, which is not an
  ``NVMLError``. ``usedGpuMemory`` can be "not available" (pynvml gives
  None): always under Windows WDDM, and for MIG when the caller lacks the
  privilege; then ``process_bytes`` is None, "NVML cannot say". A process
  in more than one list (a "C+G" process) is counted once, by its largest
  figure.
* Containers: the driver is not aware of PID namespaces. Inside a container
  with its own PID namespace, NVML lists host pids (or, with some drivers,
  nothing at all), so the worker's pid as the supervisor knows it is not
  listed: ``process_bytes`` reads 0 and ``lists_pid`` False while the worker
  holds VRAM. ``wait_reclaimed`` still means something there, because it
  also waits for the device's used memory to come back to the baseline
  taken before the worker started; that part is namespace-free. (The
  opposite, rarer error: a host pid equal to the worker's pid keeps
  ``pid_gone`` False until the timeout, and the reclaim reads incomplete.)
* Other tenants: device "used" counts every process on the GPU. On a shared
  GPU the baseline moves with them, which is what ``tolerance`` absorbs; a
  neighbour that allocates during the wait makes the reclaim read incomplete
  though the worker's memory is gone.
* NVML is initialised once per process and never shut down (``nvmlInit`` is
  refcounted; one init is enough and shutting down under a concurrent
  caller would break it). NVML itself is thread-safe; only the init is
  guarded here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# NVML error codes (nvml.h) that mean "this call does not exist or does not
# apply here", as opposed to "something went wrong".
_NVML_NOT_SUPPORTED = 3
_NVML_FUNCTION_NOT_FOUND = 13

_init_lock = threading.Lock()
_init_pid: int | None = None  # the process whose NVML is initialised (a forked child must init its own)


def _describe(exc: BaseException) -> str:
    """One line for a failed NVML call. pynvml's errors print as the driver's
    own words ("NVML Shared Library Not Found", "GPU is lost")."""
    text = str(exc).strip()
    if type(exc).__name__.startswith("NVMLError"):
        return text or f"NVML error {getattr(exc, 'value', '?')}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def nvml() -> tuple[Any, str | None]:
    """``(pynvml, None)`` with NVML initialised in this process, or
    ``(None, reason)``. A failure is not remembered: a driver loaded after
    the supervisor started is seen on the next call."""
    global _init_pid
    with _init_lock:
        try:
            import pynvml
        except ImportError as exc:
            return None, f"nvidia-ml-py is not installed ({exc})"
        if _init_pid == os.getpid():
            return pynvml, None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - any NVML failure is a reason, never a crash
            return None, _describe(exc)
        _init_pid = os.getpid()
        return pynvml, None


def _text(value: Any) -> str:
    """pynvml returns str, but releases before 11.x returned bytes."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _not_there(exc: BaseException) -> bool:
    """The call does not exist in this driver or pynvml, or does not apply
    to this device: a list that is not there is empty, not an error."""
    return isinstance(exc, AttributeError) or getattr(exc, "value", None) in (
        _NVML_NOT_SUPPORTED,
        _NVML_FUNCTION_NOT_FOUND,
    )


def device_count(nv: Any) -> tuple[int | None, str | None]:
    try:
        return int(nv.nvmlDeviceGetCount()), None
    except Exception as exc:  # noqa: BLE001 - any NVML failure is a reason, never a crash
        return None, _describe(exc)


def identity(nv: Any, index: int) -> tuple[str, str, str | None]:
    """``(name, uuid, problem)`` of NVML device ``index``; empty strings
    where NVML could not say."""
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        return _text(nv.nvmlDeviceGetName(handle)), _text(nv.nvmlDeviceGetUUID(handle)), None
    except Exception as exc:  # noqa: BLE001 - any NVML failure is a reason, never a crash
        return "", "", _describe(exc)


# ---------------------------------------------------------------- the meter


@dataclass(frozen=True)
class Reclaim:
    """What a wait for a dead worker's VRAM found.

    ``used_before``: device used while the worker was alive (the caller's
    reading, taken just before the stop). ``used_after``: the last reading.
    ``reclaimed_bytes = max(0, used_before - used_after)``, None when either
    is unknown. ``complete``: NVML no longer lists the pid *and* device used
    is back within ``tolerance`` of the baseline taken before the worker
    started."""

    seconds: float
    pid_gone: bool
    back_to_baseline: bool
    used_before: int | None
    used_after: int | None
    reclaimed_bytes: int | None
    complete: bool

    def as_result(self) -> dict[str, Any]:
        """The figures a switch result carries."""
        return {
            "reclaim_seconds": round(self.seconds, 4),
            "reclaimed_bytes": self.reclaimed_bytes,
            "reclaim_complete": self.complete,
            "vram_used_before": self.used_before,
            "vram_used_after": self.used_after,
        }


class GpuMeter:
    """One GPU seen through NVML. Every method answers None (with the cause
    in ``last_error``) rather than raise. Thread-safe, as NVML is."""

    def __init__(self, nv: Any, handle: Any, index: int, name: str, uuid: str, memory_version: int | None):
        self._nv = nv
        self._handle = handle
        self._memory_version = memory_version  # nvmlMemory_v2, or None for the v1 call
        self._process_calls: dict[str, Callable[[Any], list] | None] = {}
        self.index = index
        self.name = name
        self.uuid = uuid
        self.last_error: str | None = None

    @classmethod
    def open(cls, index: int) -> GpuMeter | str:
        """A meter for NVML device ``index``, or the reason there is none."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            return f"{index!r} is not a GPU index"
        nv, problem = nvml()
        if nv is None:
            return f"NVML is unavailable: {problem}"
        count, problem = device_count(nv)
        if count is None:
            return f"NVML cannot count GPUs: {problem}"
        if index >= count:
            return f"NVML sees {count} GPU{'s' if count != 1 else ''}; there is no GPU {index}"
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            name, uuid = _text(nv.nvmlDeviceGetName(handle)), _text(nv.nvmlDeviceGetUUID(handle))
        except Exception as exc:  # noqa: BLE001 - any NVML failure is a reason, never a crash
            return f"GPU {index}: {_describe(exc)}"
        version = getattr(nv, "nvmlMemory_v2", None)
        try:
            if version is None:
                raise AttributeError("this pynvml has no nvmlMemory_v2")
            nv.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:  # noqa: BLE001 - no v2 (driver < R510, old pynvml): the v1 call
            version = None
            try:
                nv.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # noqa: BLE001 - any NVML failure is a reason, never a crash
                return f"GPU {index} ({name}): cannot read its memory: {_describe(exc)}"
        return cls(nv, handle, index, name, uuid, version)

    def __repr__(self) -> str:
        return f"GpuMeter({self.index}, {self.name!r}, {self.uuid!r})"

    def _failed(self, what: str, exc: BaseException) -> None:
        self.last_error = f"GPU {self.index}: {what}: {_describe(exc)}"

    def memory(self) -> tuple[int, int] | None:
        """``(used_bytes, total_bytes)`` of the whole device, None on error."""
        try:
            if self._memory_version is None:
                info = self._nv.nvmlDeviceGetMemoryInfo(self._handle)
            else:
                info = self._nv.nvmlDeviceGetMemoryInfo(self._handle, version=self._memory_version)
            return int(info.used), int(info.total)
        except Exception as exc:  # noqa: BLE001 - a lost GPU must not crash the loop
            self._failed("memory info", exc)
            return None

    def _list(self, kind: str) -> tuple[list | None, bool]:
        """One running-process list (``Compute``, ``Graphics``, ``MPSCompute``)
        through the newest call this driver and pynvml have: ``(entries,
        True)``; ``(None, True)`` on error; ``(None, False)`` when there is
        no such call here, or it does not apply to this device."""
        call = self._process_calls.get(kind)
        if call is not None:
            try:
                return list(call(self._handle)), True
            except Exception as exc:  # noqa: BLE001 - a lost GPU must not crash the loop
                if not _not_there(exc):
                    self._failed(f"{kind} process list", exc)
                    return None, True
                self._process_calls.pop(kind)
        elif kind in self._process_calls:
            return None, False  # looked before: not there
        for version in ("_v3", "_v2"):
            call = getattr(self._nv, f"nvmlDeviceGet{kind}RunningProcesses{version}", None)
            if call is None:
                continue
            try:
                entries = list(call(self._handle))
            except Exception as exc:  # noqa: BLE001 - a lost GPU must not crash the loop
                if _not_there(exc):
                    continue
                self._failed(f"{kind} process list", exc)
                return None, True  # not cached: the next call looks again
            self._process_calls[kind] = call
            return entries, True
        self._process_calls[kind] = None
        return None, False

    def processes(self) -> dict[int, int | None] | None:
        """pid -> bytes NVML attributes to it on this device (None: NVML
        cannot say), over the compute, graphics and MPS lists. None on error,
        or when this driver has no compute list to read. Entries of one pid
        in one list add up (MIG instances); across lists the largest counts
        (a "C+G" process is in two lists, and counted once)."""
        merged: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics", "MPSCompute"):
            entries, exists = self._list(kind)
            if not exists:
                if kind == "Compute":
                    self.last_error = f"GPU {self.index}: this driver cannot list the processes using it"
                    return None
                continue
            if entries is None:
                return None
            here: dict[int, int | None] = {}
            for entry in entries:
                pid, used = int(entry.pid), getattr(entry, "usedGpuMemory", None)
                if used is None or (pid in here and here[pid] is None):
                    here[pid] = None
                else:
                    here[pid] = (here.get(pid) or 0) + int(used)
            for pid, used in here.items():
                known = merged.get(pid)
                merged[pid] = used if known is None else known if used is None else max(known, used)
        return merged

    def process_bytes(self, pid: int) -> int | None:
        """VRAM NVML attributes to ``pid`` on this device: 0 when NVML does
        not list it (in a container with its own PID namespace that is
        always so; see the module's docstring), None on error or when NVML
        cannot say (``usedGpuMemory`` not available)."""
        procs = self.processes()
        if procs is None:
            return None
        return procs.get(pid, 0)

    def lists_pid(self, pid: int) -> bool | None:
        """Whether NVML lists ``pid`` as using this device; None on error."""
        procs = self.processes()
        return None if procs is None else pid in procs

    def poll_reclaim(
        self, pid: int, used_before: int | None, baseline_used: int | None, tolerance: int, started: float
    ) -> Reclaim:
        """One reading of what ``wait_reclaimed`` waits for, without waiting:
        for a caller that polls from its own loop. ``started`` is the
        ``time.monotonic()`` at which the wait began."""
        listed = self.lists_pid(pid)
        memory = self.memory()
        used_after = memory[0] if memory is not None else None
        pid_gone = listed is False
        back = used_after is not None and baseline_used is not None and used_after <= baseline_used + tolerance
        reclaimed = max(0, used_before - used_after) if used_before is not None and used_after is not None else None
        return Reclaim(
            seconds=max(0.0, time.monotonic() - started),
            pid_gone=pid_gone,
            back_to_baseline=back,
            used_before=used_before,
            used_after=used_after,
            reclaimed_bytes=reclaimed,
            complete=pid_gone and back,
        )

    def wait_reclaimed(
        self,
        pid: int,
        used_before: int | None,
        baseline_used: int | None,
        tolerance: int,
        timeout: float,
        poll: float = 0.02,
    ) -> Reclaim:
        """After the worker ``pid`` is reaped: poll until NVML no longer
        lists it and device used is at most ``baseline_used + tolerance``,
        or until ``timeout`` seconds; return what the last reading found.

        ``used_before``: device used just before the worker was stopped,
        for ``reclaimed_bytes``. ``baseline_used``: device used before the
        worker started; None when there is none, and then only the pid is
        waited for and the result is never ``complete``. Never raises; a
        GPU that fails mid-wait gives an incomplete result at the timeout.
        It blocks: a single-threaded loop should call ``poll_reclaim``
        from its own timer instead."""
        started = time.monotonic()
        deadline = started + max(0.0, timeout)
        while True:
            result = self.poll_reclaim(pid, used_before, baseline_used, tolerance, started)
            if result.complete or (baseline_used is None and result.pid_gone):
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                return result
            time.sleep(min(max(poll, 0.001), left))

    def snapshot(self) -> dict[str, Any]:
        """For ``status()``: ``used_bytes``/``total_bytes`` are None when
        the device cannot be read."""
        memory = self.memory()
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "used_bytes": memory[0] if memory is not None else None,
            "total_bytes": memory[1] if memory is not None else None,
        }


def process_rss(pid: int) -> int | None:
    """Resident memory of process ``pid`` in bytes (the worker's footprint
    on a CPU-only machine; host memory, never reported as VRAM). None when
    the process is gone, a zombie, or not ours to read."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.memory_info().rss)
    except (psutil.Error, ValueError, OSError):
        return None
