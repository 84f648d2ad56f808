"""A stand-in for ``pynvml``, for the tests that need a GPU's NVML where
there is none: just the surface ``supervisor.engine.gpu`` uses, with the error
codes and words of the real library. Only NVML is stood in for; the
supervisor, its workers and their sockets stay real."""

from __future__ import annotations

from types import SimpleNamespace

MiB = 1 << 20
GiB = 1 << 30

NOT_SUPPORTED, FUNCTION_NOT_FOUND, GPU_IS_LOST, LIBRARY_NOT_FOUND, INVALID_ARGUMENT = 3, 13, 15, 12, 2
_WORDS = {
    NOT_SUPPORTED: "Not Supported",
    FUNCTION_NOT_FOUND: "Function Not Found",
    GPU_IS_LOST: "GPU is lost",
    LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    INVALID_ARGUMENT: "Invalid Argument",
}


class NVMLError(Exception):  # pynvml's errors print the driver's words and carry .value
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _WORDS[self.value]


class FakeNvml:
    """Just the pynvml surface supervisor.engine.gpu uses. ``gpus``: dicts with
    name, uuid, used, total, and process lists (pid, bytes or None) under
    Compute / Graphics / MPSCompute. ``missing``: names of calls this
    "driver" lacks (they raise FunctionNotFound, as pynvml does)."""

    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus=(), *, init_error: int | None = None, missing=()):
        self.gpus = [
            {"name": f"Fake GPU {i}", "uuid": f"GPU-{i}{i}{i}-fake", "used": GiB, "total": 80 * GiB, **g}
            for i, g in enumerate(gpus)
        ]
        self.init_error = init_error
        self.missing = set(missing)
        self.inits = 0
        self.memory_versions: list[int | None] = []

    def nvmlInit(self):
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if not 0 <= index < len(self.gpus):
            raise NVMLError(INVALID_ARGUMENT)
        return index

    def _gpu(self, handle, call):
        if call in self.missing:
            raise NVMLError(FUNCTION_NOT_FOUND)
        gpu = self.gpus[handle]
        if gpu.get("lost"):
            raise NVMLError(GPU_IS_LOST)
        return gpu

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle, "name")["name"]

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle, "uuid")["uuid"].encode()  # old pynvml returned bytes

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo_v2" if version else "nvmlDeviceGetMemoryInfo")
        self.memory_versions.append(version)
        return SimpleNamespace(total=gpu["total"], used=gpu["used"], free=gpu["total"] - gpu["used"])

    def __getattr__(self, name):
        for kind in ("Compute", "Graphics", "MPSCompute"):
            if name in (f"nvmlDeviceGet{kind}RunningProcesses_v3", f"nvmlDeviceGet{kind}RunningProcesses_v2"):

                def running(handle, kind=kind, name=name):
                    gpu = self._gpu(handle, name)
                    return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in gpu.get(kind, [])]

                return running
        raise AttributeError(name)
