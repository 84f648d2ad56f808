"""supervisor.engine.gpu and .devices: the worker's device and VRAM accounting through NVML.

Three groups:

* the real NVML of this machine, checked where it is missing (they skip,
  saying so, where NVML works: they assert the no-NVML behaviour);
* a fake ``pynvml`` put in ``sys.modules``: every branch a real GPU takes
  (merging process lists, v3 -> v2 fallbacks, a GPU lost mid-wait, NVML in
  a container), run everywhere;
* ``@pytest.mark.gpu``: a real NVIDIA GPU and a torch with CUDA. The switch
  must give back the VRAM of a worker holding a random-weight GPT-2 of about
  5 GB (built from a config by the generate mode: nothing to download, so the
  test runs on a machine with no hub), and an in-process ``del`` +
  ``empty_cache()`` of the same model is measured beside it. Skipped, with the reason, where
  there is no such GPU. torch is never imported in this process.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from supervisor import Supervisor
from supervisor.config import parse, valid_device_setting
from supervisor.engine.devices import DeviceChoice, choose_device, choose_devices
from supervisor.engine.gpu import GpuMeter, Reclaim, process_rss
from tests.helpers import ROOT, T, run_python
from tests.helpers.config import DIAG, config_text
from tests.helpers.fake_nvml import (
    LIBRARY_NOT_FOUND,
    FakeNvml,
)

MiB = 1 << 20
GiB = 1 << 30


@functools.cache
def real_nvml_reason() -> str | None:
    """None when this machine's NVML sees a GPU 0, else why not."""
    meter = GpuMeter.open(0)
    return meter if isinstance(meter, str) else None


needs_no_nvml = pytest.mark.skipif(
    "real_nvml_reason() is None",
    reason="NVML works on this machine; these tests assert the behaviour without it (the fake-NVML tests cover it)",
)


# ------------------------------------------------------------ syntax, no NVML


@pytest.mark.unit
@pytest.mark.parametrize("setting", ["auto", "cpu", "cuda:0", "cuda:1", "cuda:12"])
def test_valid_device_settings(setting):
    assert valid_device_setting(setting)


@pytest.mark.unit
@pytest.mark.parametrize(
    "setting", ["gpu", "cuda:-1", "cuda:x", 3, "", "cuda", "cuda:", "cuda:01", "CPU", " cpu", "cuda:0 ", None, True]
)
def test_bad_device_settings_are_refused(setting):
    assert not valid_device_setting(setting)
    with pytest.raises(ValueError, match=r"device must be 'auto', 'cpu' or 'cuda:N'.*got"):
        choose_device(setting)


@pytest.mark.unit
def test_cpu_hides_every_gpu_whatever_nvml_says():
    choice = choose_device("cpu")
    assert choice == DeviceChoice("cpu", "cpu", None, {"CUDA_VISIBLE_DEVICES": ""}, choice.reason)
    assert "hides every GPU" in choice.reason


@pytest.mark.process
def test_importing_the_module_imports_no_nvml_numpy_or_torch():
    code = (
        "import sys, supervisor; before = set(sys.modules); import supervisor.engine.gpu, supervisor.engine.devices; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('pynvml', 'numpy', 'torch')))"
    )
    out = run_python(code, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------ this machine without NVML


@pytest.mark.unit
@needs_no_nvml
def test_auto_without_nvml_is_cpu_and_says_why():
    choice = choose_device("auto", environ={})
    assert (choice.kind, choice.index, choice.env) == ("cpu", None, {"CUDA_VISIBLE_DEVICES": ""})
    assert choice.reason.startswith("auto: NVML sees no GPU (") and choice.reason.endswith(")")


@pytest.mark.unit
@needs_no_nvml
def test_a_pinned_gpu_is_pinned_without_nvml_but_not_verified():
    choice = choose_device("cuda:1")
    assert (choice.kind, choice.index) == ("cuda", 1)
    assert choice.env == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert "NVML is unavailable" in choice.reason and "VRAM cannot be verified" in choice.reason


@pytest.mark.unit
@needs_no_nvml
def test_a_meter_without_nvml_is_a_reason_not_an_exception():
    meter = GpuMeter.open(0)
    assert isinstance(meter, str) and meter.startswith("NVML is unavailable: ")
    assert isinstance(GpuMeter.open(-1), str) and isinstance(GpuMeter.open("0"), str)


# ------------------------------------------------------------ process RSS


@pytest.mark.process
def test_process_rss_of_a_live_process_and_of_a_reaped_one():
    assert process_rss(os.getpid()) > 0
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert process_rss(child.pid) > 0
    finally:
        child.kill()
        child.wait(10)
    assert process_rss(child.pid) is None


@pytest.mark.process
def test_process_rss_of_a_zombie_is_none():
    child = subprocess.Popen(["sleep", "30"])
    child.kill()
    try:
        deadline = time.monotonic() + 10
        while process_rss(child.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert process_rss(child.pid) is None  # dead, not yet reaped
    finally:
        child.wait(10)


# ------------------------------------------------------------ a fake pynvml (tests/helpers/fake_nvml.py, fixture in conftest)


@pytest.mark.unit
def test_fake_no_library_gives_reasons_everywhere(fake_nvml):
    fake_nvml(FakeNvml(init_error=LIBRARY_NOT_FOUND))
    auto = choose_device("auto", environ={})
    assert auto == DeviceChoice(
        "auto", "cpu", None, {"CUDA_VISIBLE_DEVICES": ""}, "auto: NVML sees no GPU (NVML Shared Library Not Found)"
    )
    pinned = choose_device("cuda:1", environ={})
    assert pinned.env == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert pinned.reason.endswith("NVML is unavailable (NVML Shared Library Not Found), so VRAM cannot be verified")
    assert GpuMeter.open(0) == "NVML is unavailable: NVML Shared Library Not Found"


@pytest.mark.unit
def test_fake_no_gpu_auto_is_cpu_and_cuda_n_is_refused(fake_nvml):
    fake_nvml(FakeNvml([]))
    assert choose_device("auto", environ={}).reason == "auto: NVML sees no GPU (0 devices)"
    with pytest.raises(ValueError, match=r"device 'cuda:0': there is no such GPU; NVML sees no GPU"):
        choose_device("cuda:0")
    assert GpuMeter.open(0) == "NVML sees 0 GPUs; there is no GPU 0"


@pytest.mark.unit
def test_fake_two_gpus_pin_by_uuid_and_refuse_a_third(fake_nvml):
    fake = fake_nvml(FakeNvml([{}, {}]))
    auto = choose_device("auto", environ={})
    assert (auto.kind, auto.index) == ("cuda", 0)
    assert auto.env == {"CUDA_VISIBLE_DEVICES": "GPU-000-fake", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert auto.reason == "auto: NVML sees 2 GPUs, using cuda:0: Fake GPU 0 (GPU-000-fake)"
    one = choose_device("cuda:1", environ={"CUDA_VISIBLE_DEVICES": "0"})
    assert (one.index, one.env["CUDA_VISIBLE_DEVICES"]) == (1, "GPU-111-fake")
    assert "over CUDA_VISIBLE_DEVICES='0'" in one.reason
    with pytest.raises(ValueError, match=r"'cuda:2': there is no such GPU; NVML sees 2 GPUs \(cuda:0 to cuda:1\)"):
        choose_device("cuda:2")
    assert fake.inits == 1  # one nvmlInit per process, however many calls


@pytest.mark.unit
@pytest.mark.parametrize(
    ("environ", "kind", "index", "words"),
    [
        ({"CUDA_VISIBLE_DEVICES": ""}, "cpu", None, "hides every GPU"),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, "cpu", None, "hides every GPU"),
        ({"CUDA_VISIBLE_DEVICES": "7"}, "cpu", None, "names no GPU NVML sees"),
        ({"CUDA_VISIBLE_DEVICES": "1,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, "cuda", 1, "NVML device 1, Fake GPU 1"),
        ({"CUDA_VISIBLE_DEVICES": "GPU-111"}, "cuda", 1, "NVML device 1"),
        ({"CUDA_VISIBLE_DEVICES": "1"}, "cuda", None, "VRAM cannot be verified"),  # CUDA's order may not be NVML's
        ({"CUDA_VISIBLE_DEVICES": "MIG-abc"}, "cuda", None, "VRAM cannot be verified"),
    ],
)
def test_fake_auto_honours_the_supervisors_cuda_visible_devices(fake_nvml, environ, kind, index, words):
    fake_nvml(FakeNvml([{}, {}]))
    choice = choose_device("auto", environ=environ)
    assert (choice.kind, choice.index) == (kind, index)
    assert choice.env == ({"CUDA_VISIBLE_DEVICES": ""} if kind == "cpu" else {})  # inherited, not overridden
    assert words in choice.reason and repr(environ["CUDA_VISIBLE_DEVICES"]) in choice.reason


@pytest.mark.unit
def test_fake_meter_merges_the_process_lists(fake_nvml):
    fake_nvml(
        FakeNvml(
            [
                {},
                {
                    "used": 5 * GiB,
                    "Compute": [(100, 3 * GiB), (200, None), (300, GiB)],
                    "Graphics": [(300, GiB), (400, 64 * MiB)],  # 300 is "C+G": counted once
                    "MPSCompute": [(500, MiB), (500, MiB)],  # two MIG instances add up
                },
            ]
        )
    )
    meter = GpuMeter.open(1)
    assert (meter.index, meter.name, meter.uuid) == (1, "Fake GPU 1", "GPU-111-fake")
    assert meter.memory() == (5 * GiB, 80 * GiB)
    assert meter.process_bytes(100) == 3 * GiB
    assert meter.process_bytes(200) is None  # NVML cannot say (WDDM, MIG without privilege)
    assert meter.process_bytes(300) == GiB
    assert meter.process_bytes(400) == 64 * MiB
    assert meter.process_bytes(500) == 2 * MiB
    assert meter.process_bytes(999) == 0
    assert (meter.lists_pid(200), meter.lists_pid(999)) == (True, False)
    assert meter.snapshot() == {
        "index": 1,
        "name": "Fake GPU 1",
        "uuid": "GPU-111-fake",
        "used_bytes": 5 * GiB,
        "total_bytes": 80 * GiB,
    }


@pytest.mark.unit
def test_fake_old_driver_falls_back_to_v2_calls_and_v1_memory(fake_nvml):
    missing = {
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetMPSComputeRunningProcesses_v3",
        "nvmlDeviceGetMPSComputeRunningProcesses_v2",
    }
    fake = fake_nvml(FakeNvml([{"Compute": [(100, GiB)], "Graphics": [(100, 2 * GiB)]}], missing=missing))
    meter = GpuMeter.open(0)
    assert meter.process_bytes(100) == 2 * GiB
    assert meter.memory() == (GiB, 80 * GiB)
    assert fake.memory_versions[-1] is None  # v1 from open() on, so every reading is comparable


@pytest.mark.unit
def test_fake_new_driver_reads_memory_v2(fake_nvml):
    fake = fake_nvml(FakeNvml([{}]))
    GpuMeter.open(0).memory()
    assert fake.memory_versions == [FakeNvml.nvmlMemory_v2] * 2


@pytest.mark.unit
def test_fake_a_driver_without_any_compute_list_cannot_say(fake_nvml):
    missing = {f"nvmlDeviceGetComputeRunningProcesses{v}" for v in ("_v2", "_v3")}
    fake_nvml(FakeNvml([{}], missing=missing))
    meter = GpuMeter.open(0)
    assert meter.process_bytes(1) is None and meter.lists_pid(1) is None
    assert "cannot list the processes" in meter.last_error


@pytest.mark.process
def test_fake_a_lost_gpu_gives_none_and_a_wait_that_ends(fake_nvml):
    fake = fake_nvml(FakeNvml([{"Compute": [(100, GiB)]}]))
    meter = GpuMeter.open(0)
    fake.gpus[0]["lost"] = True
    assert meter.memory() is None and meter.last_error == "GPU 0: memory info: GPU is lost"
    assert meter.process_bytes(100) is None and meter.lists_pid(100) is None
    assert meter.snapshot()["used_bytes"] is None
    r = meter.wait_reclaimed(100, used_before=2 * GiB, baseline_used=GiB, tolerance=MiB, timeout=0.1, poll=0.01)
    assert r == Reclaim(r.seconds, False, False, 2 * GiB, None, None, False)


class ReclaimingGpu(FakeNvml):
    """After ``polls`` memory readings the worker is gone from the lists and
    its memory is back (what the driver does some time after the exit)."""

    def __init__(self, polls: int, *, listed: bool = True, leak: int = 0):
        super().__init__([{"used": 6 * GiB, "Compute": [(4242, 5 * GiB)] if listed else [(77, 5 * GiB)]}])
        self.polls, self.leak = polls, leak

    def nvmlDeviceGetMemoryInfo(self, handle, version=None):
        self.polls -= 1
        if self.polls <= 0:
            self.gpus[0].update(used=GiB + self.leak, Compute=[(77, 5 * GiB)])  # 77: another tenant's pid
        return super().nvmlDeviceGetMemoryInfo(handle, version)


@pytest.mark.process
def test_fake_wait_reclaimed_waits_for_the_pid_and_the_baseline(fake_nvml):
    fake_nvml(ReclaimingGpu(polls=5))
    meter = GpuMeter.open(0)
    assert meter.process_bytes(4242) == 5 * GiB
    before = meter.memory()[0]
    r = meter.wait_reclaimed(4242, used_before=before, baseline_used=GiB, tolerance=64 * MiB, timeout=30, poll=0.001)
    assert (r.pid_gone, r.back_to_baseline, r.complete) == (True, True, True)
    assert (r.used_before, r.used_after, r.reclaimed_bytes) == (6 * GiB, GiB, 5 * GiB)
    assert r.seconds >= 0
    assert r.as_result() == {
        "reclaim_seconds": round(r.seconds, 4),
        "reclaimed_bytes": 5 * GiB,
        "reclaim_complete": True,
        "vram_used_before": 6 * GiB,
        "vram_used_after": GiB,
    }


@pytest.mark.process
def test_fake_wait_reclaimed_reports_a_leak_at_the_timeout(fake_nvml):
    fake_nvml(ReclaimingGpu(polls=1, leak=512 * MiB))
    r = GpuMeter.open(0).wait_reclaimed(4242, 6 * GiB, GiB, tolerance=64 * MiB, timeout=0.05, poll=0.01)
    assert (r.pid_gone, r.back_to_baseline, r.complete) == (True, False, False)
    assert r.reclaimed_bytes == 6 * GiB - (GiB + 512 * MiB)


@pytest.mark.process
def test_fake_in_a_container_the_wait_rests_on_device_used(fake_nvml):
    """NVML lists host pids (here 77) in a container: the worker's pid is
    never listed, so process_bytes reads 0 and the device's used memory
    coming back to the baseline is what decides."""
    fake_nvml(ReclaimingGpu(polls=4, listed=False))
    meter = GpuMeter.open(0)
    assert meter.process_bytes(4242) == 0 and meter.lists_pid(4242) is False
    r = meter.wait_reclaimed(4242, 6 * GiB, GiB, tolerance=64 * MiB, timeout=30, poll=0.001)
    assert r.complete and r.used_after == GiB


@pytest.mark.process
def test_fake_without_a_baseline_only_the_pid_is_waited_for(fake_nvml):
    fake_nvml(ReclaimingGpu(polls=3))
    r = GpuMeter.open(0).wait_reclaimed(4242, 6 * GiB, None, tolerance=0, timeout=30, poll=0.001)
    assert r.pid_gone and not r.back_to_baseline and not r.complete and r.reclaimed_bytes == 5 * GiB


# ------------------------------------------------------------ the real pynvml over a stub driver

# A libnvidia-ml.so.1 with just the calls supervisor.engine.gpu makes, laid out as
# nvml.h says: drives pynvml's own ctypes wrappers (struct versions, the
# two-call process lists, NVML_VALUE_NOT_AVAILABLE -> None, a missing
# symbol -> FunctionNotFound) with no GPU. The worker (pid 4242) leaves the
# lists on the 3rd reading of memory and its 5 GiB are back on the 4th.
STUB_DRIVER = r"""
#include <string.h>
typedef struct { unsigned int pid; unsigned long long used; unsigned int gi, ci; } proc_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } mem2_t;
static int readings = 0;
int nvmlInitWithFlags(unsigned int flags) { return 0; }
int nvmlDeviceGetCount_v2(unsigned int *count) { *count = 1; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) { if (i) return 2; *h = (void *)0x1; return 0; }
int nvmlDeviceGetName(void *h, char *s, unsigned int n) { strncpy(s, "Stub GPU", n); return 0; }
int nvmlDeviceGetUUID(void *h, char *s, unsigned int n) { strncpy(s, "GPU-5705-stub", n); return 0; }
int nvmlDeviceGetMemoryInfo_v2(void *h, mem2_t *m) {
    if (m->version != 0x02000028) return 25;
    readings++;
    m->total = 80ULL << 30; m->reserved = 500ULL << 20; m->used = (readings > 3 ? 1ULL : 6ULL) << 30;
    m->free = m->total - m->reserved - m->used;
    return 0;
}
static int list(unsigned int *count, proc_t *out, int n, const unsigned int *pids, const unsigned long long *used) {
    if (n == 0) { *count = 0; return 0; }
    if (*count < (unsigned int)n) { *count = n; return 7; }  /* NVML_ERROR_INSUFFICIENT_SIZE */
    for (int i = 0; i < n; i++) { out[i].pid = pids[i]; out[i].used = used[i]; out[i].gi = out[i].ci = ~0U; }
    *count = n;
    return 0;
}
int nvmlDeviceGetComputeRunningProcesses_v3(void *h, unsigned int *count, proc_t *out) {
    static const unsigned int pids[] = {4242, 31};
    static const unsigned long long used[] = {5ULL << 30, ~0ULL};  /* 31: NVML_VALUE_NOT_AVAILABLE */
    return readings >= 3 ? list(count, out, 1, pids + 1, used + 1) : list(count, out, 2, pids, used);
}
int nvmlDeviceGetGraphicsRunningProcesses_v3(void *h, unsigned int *count, proc_t *out) {
    return list(count, out, 0, 0, 0);
}
"""

STUB_CLIENT = """
import json
from supervisor.engine.devices import choose_device
from supervisor.engine.gpu import GpuMeter
m = GpuMeter.open(0)
out = {"choice": choose_device("auto", environ={}).__dict__, "snapshot": m.snapshot(),
       "worker": m.process_bytes(4242), "unknown": m.process_bytes(31), "absent": m.process_bytes(7)}
r = m.wait_reclaimed(4242, used_before=6 << 30, baseline_used=1 << 30, tolerance=64 << 20, timeout=30, poll=0.001)
out["reclaim"] = r.as_result() | {"pid_gone": r.pid_gone}
print(json.dumps(out))
"""


@pytest.mark.process
def test_the_real_pynvml_over_a_stub_driver(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the stub libnvidia-ml.so.1")
    (tmp_path / "stub.c").write_text(STUB_DRIVER)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(tmp_path / "libnvidia-ml.so.1"), str(tmp_path / "stub.c")],
        check=True,
        timeout=T,
    )
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(
        [sys.executable, "-c", STUB_CLIENT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=T
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["choice"] == {
        "setting": "auto",
        "kind": "cuda",
        "index": 0,
        "env": {"CUDA_VISIBLE_DEVICES": "GPU-5705-stub", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        "reason": "auto: NVML sees 1 GPU, using cuda:0: Stub GPU (GPU-5705-stub)",
    }
    assert got["snapshot"] == {
        "index": 0,
        "name": "Stub GPU",
        "uuid": "GPU-5705-stub",
        "used_bytes": 6 * GiB,
        "total_bytes": 80 * GiB,
    }
    assert (got["worker"], got["unknown"], got["absent"]) == (5 * GiB, None, 0)
    reclaim = got["reclaim"]
    assert (reclaim["pid_gone"], reclaim["reclaim_complete"], reclaim["reclaimed_bytes"]) == (True, True, 5 * GiB)


# ------------------------------------------------------------ a real GPU

GPU_T = 10 * T  # a model onto a real GPU, or torch asked about CUDA: generous, only there to stop a hang
WITHIN = 64 * MiB
# About 1.2 billion parameters, 4.9 GB in float32: far above anything a CUDA
# context or an allocator's slack could be mistaken for.
BIG_SIZE = {"n_embd": 2048, "n_layer": 24, "n_head": 16}
BIG = {"loader": "worker.modes.generate:load", "args": {"device": "cuda", "size": BIG_SIZE}}
PROMPT = {"prompt": "hello", "max_new_tokens": 8}
_FIGURES: dict[str, dict] = {}


@functools.cache
def gpu_skip_reason() -> str | None:
    """Why the real-GPU tests cannot run here, or None. torch is asked in a
    subprocess, pinned the way the worker will be: importing it here would
    put torch (and maybe a CUDA context) into the supervisor's process."""
    if real_nvml_reason() is not None:
        return f"no NVIDIA GPU: {real_nvml_reason()}"
    code = (
        "import json, torch; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'available': torch.cuda.is_available()}))"
    )
    env = {**os.environ, **choose_device("cuda:0").env}
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=GPU_T)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return f"NVML sees a GPU, but torch in {sys.prefix} cannot be asked about CUDA: {exc!r}"
    if not info["available"]:
        return (
            f"NVML sees a GPU, but torch {info['torch']} in {sys.prefix} has no usable CUDA "
            f"(torch.version.cuda={info['cuda']}); see README.md, 'GPU install'"
        )
    return None


@pytest.fixture
def gpu_meter() -> GpuMeter:
    reason = gpu_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    meter = GpuMeter.open(0)
    assert not isinstance(meter, str), meter
    return meter


def used_now(meter: GpuMeter) -> int:
    memory = meter.memory()
    assert memory is not None, meter.last_error
    return memory[0]


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(GPU_T * 2)
def test_a_switch_gives_back_the_big_workers_vram(gpu_meter, tmp_path, record_property):
    path = tmp_path / "gpu.toml"
    path.write_text(config_text({"big": BIG, "diag": DIAG}, supervisor={"device": "cuda:0"}))
    sup = Supervisor(path).start()
    try:
        baseline = used_now(gpu_meter)
        loaded = sup.switch_mode("big").result(GPU_T)
        text = sup.submit("generate", PROMPT, mode="big").result(GPU_T)
        assert text, "the big model generated nothing"
        info = sup.submit("info", None, mode="big").result(T)
        assert info["device"] == "cuda" and info["parameters"] > 10**9, info
        pid = loaded["pid"]
        assert sup.status()["worker_pid"] == pid
        used_loaded = used_now(gpu_meter)
        held = gpu_meter.process_bytes(pid)
        listed = gpu_meter.lists_pid(pid)
        assert used_loaded > baseline + 4 * GiB, "the big worker put less than 4 GiB on GPU 0: is it on the CPU?"
        if listed:
            assert held is None or held > 0
        else:  # a container's PID namespace: NVML lists host pids, or none
            print(f"\nNVML does not list worker pid {pid}: relying on device used alone")

        switched = sup.switch_mode("diag").result(2 * T)
        used_after = used_now(gpu_meter)
        assert switched["pid"] != pid
        assert gpu_meter.lists_pid(pid) is False
        assert switched["reclaimed_bytes"] > 0
        assert switched["reclaim_seconds"] >= 0
        assert switched["reclaim_complete"] is True
        assert used_after <= baseline + WITHIN, f"{mib(used_after - baseline)} MiB more than before the big worker"
    finally:
        sup.shutdown()

    figures = {
        "baseline_used": baseline,
        "loaded_used": used_loaded,
        "worker_process_bytes": held,
        "stays_device_bytes": used_after - baseline,
        "reclaimed_bytes": switched["reclaimed_bytes"],
        "reclaim_seconds": switched["reclaim_seconds"],
    }
    _FIGURES["switch"] = figures
    for key, value in figures.items():
        record_property(f"switch_{key}", value)
    print(f"\ngpuvisor switch on {gpu_meter.name}: {json.dumps(figures)}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(GPU_T * 2)
def test_an_in_process_del_and_empty_cache_is_measured_beside_it(gpu_meter, record_property):
    env = {**os.environ, **choose_device("cuda:0").env}
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "helpers" / "gpu_inprocess_probe.py"), "0", json.dumps(BIG["args"])],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=GPU_T,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["loaded_used"] > probe["baseline_used"] + 4 * GiB, "the probe put less than 4 GiB on GPU 0"
    for key, value in probe.items():
        record_property(f"inprocess_{key}", value)

    switch = _FIGURES.get("switch", {})
    rows = [
        ("gpuvisor switch (worker killed)", switch.get("stays_device_bytes"), None, None),
        (
            "in-process del + empty_cache()",
            probe["stays_device_bytes"],
            probe["stays_process_bytes"],
            probe["stays_torch_reserved"],
        ),
    ]
    loaded = probe["loaded_used"] - probe["baseline_used"]
    print(f"\nVRAM left on GPU 0 ({gpu_meter.name}) after unloading a {mib(loaded)} MiB model, MiB")
    print(f"{'':34}{'device used - baseline':>24}{'NVML bytes of the pid':>24}{'torch reserved':>16}")
    for label, device, process, reserved in rows:
        gone = "(process gone)" if label.startswith("gpuvisor") else mib(process)
        print(f"{label:34}{mib(device):>24}{gone:>24}{mib(reserved):>16}")
    if not switch:
        print("(the switch figure is missing: run test_a_switch_gives_back_the_big_workers_vram first)")


@pytest.mark.unit
def test_fake_devices_auto_is_every_gpu_each_pinned_by_its_uuid(fake_nvml):
    fake_nvml(FakeNvml([{}, {}]))
    chosen = choose_devices("auto", environ={})
    assert [name for name, _ in chosen] == ["cuda:0", "cuda:1"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for _, c in chosen] == ["GPU-000-fake", "GPU-111-fake"]
    assert [c.index for _, c in chosen] == [0, 1]
    fake_nvml(FakeNvml([]))
    assert [(name, c.kind) for name, c in choose_devices("auto", environ={})] == [("cpu", "cpu")]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.timeout(GPU_T * 3)
def test_two_gpus_each_worker_on_its_own_and_a_switch_frees_only_its_own(gpu_meter, record_property):
    """Two real GPUs under one supervisor: the big mode on both (replicas =
    2), each worker's memory on its own GPU; switching one device to diag
    gives that GPU's memory back and leaves the other's worker alone."""
    second = GpuMeter.open(1)
    if isinstance(second, str):
        pytest.skip(f"one GPU only: {second}")
    big = {**BIG, "replicas": 2}
    text = config_text({"big": big, "diag": DIAG}, supervisor={"devices": ["cuda:0", "cuda:1"]})
    sup = Supervisor(parse(text, "two-gpus.toml")).start()
    meters = {"cuda:0": gpu_meter, "cuda:1": second}
    try:
        baseline = {name: used_now(m) for name, m in meters.items()}
        for name in meters:
            sup.switch_mode("big", device=name).result(GPU_T)
        devices = {d["name"]: d for d in sup.status()["devices"]}
        loaded = {name: used_now(m) for name, m in meters.items()}
        for name in meters:
            assert devices[name]["mode"] == "big"
            assert loaded[name] > baseline[name] + 4 * GiB, f"not the big worker's 4 GiB on {name}"
        keep = devices["cuda:0"]["worker_pid"]
        switched = sup.switch_mode("diag", device="cuda:1").result(2 * T)
        assert switched["reclaim_complete"] is True and switched["reclaimed_bytes"] > 0
        assert used_now(second) <= baseline["cuda:1"] + WITHIN
        assert {d["name"]: d["worker_pid"] for d in sup.status()["devices"]}["cuda:0"] == keep
        assert used_now(gpu_meter) > baseline["cuda:0"] + WITHIN, "cuda:0's worker kept its model"
    finally:
        sup.shutdown()
    for name in meters:
        record_property(f"two_gpus_{name}_loaded_minus_baseline", loaded[name] - baseline[name])
    print(f"\ntwo GPUs: loaded - baseline MiB {[mib(loaded[n] - baseline[n]) for n in meters]}")
