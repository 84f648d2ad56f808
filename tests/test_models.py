"""Model-serving behaviour on CPU with real workers: streaming, out of
memory, warm-up, idle unload, memory figures in status(), several models in
one mode, and the ``generate`` mode end to end."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time

import psutil
import pytest

from gpuvisor.testing import load_mode, mode_fixture
from supervisor import AsyncSupervisor, JobFailed, ModeLoadError, OutOfMemory, Supervisor, WorkerCrashed
from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.fake_nvml import FakeNvml

MiB = 1 << 20
TWO_DIAGS = {"diag": DIAG, "other": DIAG}


# ----------------------------------------------------------------- streaming


# The diag mode's streams, through the kit a mode's author tests with: one worker for these tests.
diag = mode_fixture(DIAG)


@pytest.mark.process
def test_a_stream_yields_every_chunk_in_order_then_ends_with_the_return_value(diag):
    stream = diag.stream("count", {"n": 50})
    assert list(stream) == list(range(50))
    assert stream.result(T) == {"count": 50} and stream.future.done()
    assert list(stream) == []  # iterating a finished stream again ends again


@pytest.mark.process
def test_chunks_arrive_while_the_job_still_runs(diag):
    stream = diag.stream("count", {"n": 3, "delay": 1.0})
    assert next(stream) == 0
    assert not stream.future.done()  # the handler is sleeping before its next chunk
    assert list(stream) == [1, 2] and stream.result(T) == {"count": 3}


@pytest.mark.process
def test_without_stream_a_generator_handler_gives_its_return_value_only(diag):
    assert diag.call("count", {"n": 5}) == {"count": 5}


@pytest.mark.process
def test_a_crash_mid_stream_ends_it_with_worker_crashed_after_the_chunks_sent():
    # The delay lets each chunk leave the worker before the next step: a chunk
    # still inside a process that is SIGKILLed is lost with it.
    with load_mode(DIAG) as diag:
        stream = diag.stream("count", {"n": 10, "die_after": 4, "delay": 0.2})
        got = []
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            for chunk in stream:
                got.append(chunk)
        assert got == [0, 1, 2, 3]
        assert diag.call("echo", "after") == "after"  # a fresh worker


@pytest.mark.process
def test_a_handler_error_mid_stream_is_the_streams_one_typed_outcome(diag):
    stream = diag.stream("count", {"n": "three"})
    with pytest.raises(JobFailed, match="'n' must be a whole number"):
        list(stream)
    with pytest.raises(JobFailed):
        stream.result(T)


@pytest.mark.process
def test_an_unsendable_chunk_fails_the_job_and_the_worker_serves_on(supervisor_from):
    sup = supervisor_from(config_text({"s": "tests.helpers.loaders:streams"}))
    stream = sup.submit("unsendable", None, mode="s", stream=True)
    with pytest.raises(JobFailed, match="returned a chunk that cannot be sent"):
        list(stream)
    pid = sup.status()["worker_pid"]
    assert list(sup.submit("unsendable", {"ok": True}, mode="s", stream=True)) == ["fine"]
    assert sup.status()["worker_pid"] == pid


@pytest.mark.process
def test_stream_arguments_are_checked(sup):
    with pytest.raises(ValueError, match="cannot be retried"):
        sup.submit("count", mode="diag", stream=True, retries=1)
    with pytest.raises(TypeError, match="stream must be a bool"):
        sup.submit("count", mode="diag", stream="yes")


@pytest.mark.process
def test_a_queued_stream_can_be_cancelled_and_says_so(sup):
    sup.switch_mode("diag").result(T)
    blocker = sup.submit("sleep", {"seconds": 0.5})
    stream = sup.submit("count", {"n": 3}, stream=True)
    assert stream.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        list(stream)
    blocker.result(T)


@pytest.mark.process
def test_async_streams_are_async_iterators_with_the_same_guarantees():
    async def main():
        async with AsyncSupervisor(mode="diag") as sup:
            stream = await sup.submit("count", {"n": 20}, stream=True)
            got = [chunk async for chunk in stream]
            assert got == list(range(20)) and await stream.result(T) == {"count": 20}
            crashed = await sup.submit("count", {"n": 5, "die_after": 2, "delay": 0.2}, stream=True)
            seen = []
            with pytest.raises(WorkerCrashed):
                async for chunk in crashed:
                    seen.append(chunk)
            assert seen == [0, 1]

    asyncio.run(asyncio.wait_for(main(), T))


# ----------------------------------------------------------------- out of memory


@pytest.mark.process
def test_a_memory_error_is_out_of_memory_and_the_worker_is_recycled(sup):
    old = sup.submit("pid", mode="diag").result(T)
    with pytest.raises(OutOfMemory, match="MemoryError") as info:
        sup.submit("oom", mode="diag").result(T)
    assert isinstance(info.value, JobFailed) and info.value.remote_type == "MemoryError"
    assert pid_gone(old)  # stopped before the outcome was handed out
    status = sup.status()
    assert status["worker_pid"] is None and status["generation"] == 1  # none loaded for nothing
    new = sup.submit("pid").result(T)  # no mode named: the recycled mode is still in force
    assert new != old
    status = sup.status()
    assert status["oom_recycles"] == 1 and status["restarts"] == 0 and status["generation"] == 2  # not a death


@pytest.mark.process
def test_an_oom_before_a_switch_loads_only_the_new_mode(supervisor_from):
    sup = supervisor_from(config_text(TWO_DIAGS))
    oom = sup.submit("oom", mode="diag")
    switched = sup.switch_mode("other")
    with pytest.raises(OutOfMemory):
        oom.result(T)
    assert switched.result(T)["status"] == "loaded" and sup.status()["generation"] == 2


@pytest.mark.process
def test_recycle_on_oom_false_keeps_the_worker(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"recycle_on_oom": False}))
    old = sup.submit("pid", mode="diag").result(T)
    with pytest.raises(OutOfMemory):
        sup.submit("oom").result(T)
    assert sup.submit("pid").result(T) == old and sup.status()["oom_recycles"] == 0


# ----------------------------------------------------------------- warm-up


@pytest.mark.process
def test_a_warm_up_job_runs_after_the_load_and_before_ready(supervisor_from, tmp_path):
    marker = tmp_path / "warmed"
    warmable = {"loader": "tests.helpers.loaders:warmable", "warmup": {"task": "warm", "payload": str(marker)}}
    sup = supervisor_from(config_text({"w": warmable}))
    result = sup.switch_mode("w").result(T)
    assert result["warmup_seconds"] is not None and result["warmup_seconds"] >= 0.2  # the warm task sleeps 0.2 s
    assert marker.read_text() == str(result["pid"])  # done by the worker that then said READY
    assert sup.submit("was_warmed", mode="w").result(T) is True


@pytest.mark.process
def test_a_failing_warm_up_fails_the_switch_with_its_reason(supervisor_from):
    sup = supervisor_from(config_text({"w": {"loader": DIAG, "warmup": {"task": "fail"}}}))
    with pytest.raises(ModeLoadError, match="warm-up job 'fail' failed: RuntimeError"):
        sup.switch_mode("w").result(T)
    sup2 = supervisor_from(config_text({"w": {"loader": DIAG, "warmup": {"task": "nope"}}}))
    with pytest.raises(ModeLoadError, match="warm-up task 'nope' is not one of this mode's tasks"):
        sup2.switch_mode("w").result(T)


@pytest.mark.process
@pytest.mark.slow
def test_a_torch_mode_whose_warm_up_fails_exits_3_by_itself_without_being_signalled(supervisor_from, caplog):
    """A worker that imported torch and built a model takes seconds to tear
    down; after LOAD_FAILED it leaves at once with its own exit code, so the
    switch fails without waiting for a SIGTERM (and the log says code 3)."""
    sup = supervisor_from(config_text({"w": {"loader": "worker.modes.generate:load", "warmup": {"task": "nope"}}}))
    with pytest.raises(ModeLoadError, match="warm-up task 'nope' is not one of this mode's tasks"):
        sup.switch_mode("w").result(T)
    stopped = [r.getMessage() for r in caplog.records if "its mode failed to load" in r.getMessage()]
    assert stopped and "exited with code 3" in stopped[-1], stopped
    assert sup.status()["worker_pid"] is None


# ----------------------------------------------------------------- idle unload


@pytest.mark.process
def test_an_idle_worker_is_unloaded_and_the_next_job_loads_it_again(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"idle_unload_s": 0.5}))
    first = sup.submit("pid", mode="diag").result(T)
    wait_until(lambda: sup.status()["worker_pid"] is None, T, "the idle worker to be unloaded")
    assert pid_gone(first)
    status = sup.status()
    assert status["idle_unloaded"] == "diag" and status["mode"] is None and status["restarts"] == 0
    second = sup.submit("pid").result(T)  # names no mode: the unloaded one is still in force
    assert second != first and sup.status()["idle_unloaded"] is None
    wait_until(lambda: sup.status()["worker_pid"] is None, T, "the second unload")
    result = sup.switch_mode("diag").result(T)
    assert result["status"] == "loaded" and result["previous"] is None
    assert "previous_pid" not in result  # no reclaim figures from a worker stopped long before this switch


@pytest.mark.process
def test_idle_unload_never_stops_a_running_job(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"idle_unload_s": 0.3}))
    pid = sup.submit("pid", mode="diag").result(T)
    assert sup.submit("sleep", {"seconds": 1.5}).result(T) == {"slept": 1.5}  # five idle periods long
    assert sup.submit("pid").result(T) == pid or pid_gone(pid)  # unloaded only after it finished
    stream = sup.submit("count", {"n": 3, "delay": 0.5}, mode="diag", stream=True)
    assert list(stream) == [0, 1, 2] and stream.result(T) == {"count": 3}


@pytest.mark.process
def test_a_mode_may_set_its_own_idle_unload(supervisor_from):
    sticky = {"loader": DIAG, "idle_unload_s": 0}
    sup = supervisor_from(config_text({"diag": DIAG, "sticky": sticky}, supervisor={"idle_unload_s": 0.3}))
    pid = sup.submit("pid", mode="sticky").result(T)
    wait_until(lambda: sup.status()["jobs_done"] >= 1, T, "the job")
    with pytest.raises(AssertionError):
        wait_until(lambda: sup.status()["worker_pid"] is None, 1.5, "an unload that must not happen")
    assert sup.submit("pid").result(T) == pid


# ----------------------------------------------------------------- memory in status()


@pytest.mark.process
def test_status_reports_memory_without_a_gpu_and_never_calls_rss_vram(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"heartbeat_interval": 0.2, "heartbeat_timeout": 5}))
    before = sup.status()
    for key in ("device", "gpu", "gpu_unavailable", "worker_rss_bytes", "worker_vram_bytes", "worker_torch"):
        assert key in before
    if before["gpu"] is not None:
        pytest.skip("this machine has a GPU that NVML sees; tests/test_gpu.py covers it")
    assert before["device"] == "cpu" and "NVML" in before["gpu_unavailable"]
    pid = sup.submit("pid", mode="diag").result(T)
    wait_until(lambda: sup.status()["worker_rss_bytes"], T, "a heartbeat's memory sample")
    status = sup.status()
    assert status["worker_pid"] == pid and status["worker_rss_bytes"] > 1 << 20
    assert status["worker_vram_bytes"] is None and status["worker_torch"] is None  # diag never imports torch


@pytest.mark.process
def test_a_switch_reports_what_it_reclaimed(supervisor_from):
    sup = supervisor_from(config_text(TWO_DIAGS))
    sup.switch_mode("diag").result(T)
    wait_until(lambda: sup.status()["worker_rss_bytes"], T, "a memory sample")
    old = sup.status()["worker_pid"]
    result = sup.switch_mode("other").result(T)
    assert result["previous_pid"] == old and result["previous_rss_bytes"] > 0
    assert result["reclaim_seconds"] >= 0
    if sup.status()["gpu"] is None:
        assert result["reclaimed_bytes"] is None and result["reclaim_complete"] is None  # RSS is not VRAM


@pytest.mark.process
def test_the_worker_is_pinned_to_its_device(supervisor_from):
    sup = supervisor_from(config_text(supervisor={"device": "cpu"}))
    pid = sup.submit("pid", mode="diag").result(T)
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert env[b"CUDA_VISIBLE_DEVICES"] == b""
    assert sup.status()["device"] == "cpu"


# ----------------------------------------------------------------- real models


@pytest.mark.process
@pytest.mark.slow
def test_generate_streams_tokens_that_add_up_to_its_result():
    """The tiny built-in model has random weights: its text is gibberish, so
    only its shape and consistency are checked."""
    with load_mode("worker.modes.generate:load", wait=3 * T) as generate:
        request = {"prompt": "Hello", "max_new_tokens": 12}
        stream = generate.stream("generate", request)
        chunks = list(stream)
        final = stream.result(T)
        assert [c["token"] for c in chunks] == final["tokens"] and len(final["tokens"]) <= 12
        assert "".join(c["text"] for c in chunks) == final["text"]
        assert generate.call("generate", request) == final  # greedy: the same again
        info = generate.call("info")
        assert info["random_weights"] is True and info["model"] == "tiny-random"


@pytest.mark.process
@pytest.mark.slow
def test_one_mode_may_hold_two_models(tmp_path):
    with Supervisor() as sup:
        result = sup.switch_mode("assistant").result(3 * T)  # two models to load
        assert result["warmup_seconds"] is not None
        vectors = sup.submit("embed", {"texts": ["a", "b"]}).result(T)
        text = sup.submit("generate", {"prompt": "x", "max_new_tokens": 3}).result(T)
        assert vectors.shape == (2, 384) and len(text["tokens"]) <= 3
        assert sup.status()["worker_pid"] == result["pid"]  # one process served both


@pytest.mark.process
def test_compose_refuses_a_task_defined_twice(supervisor_from):
    compose = {"loader": "worker.modes.compose:load", "args": {"parts": [{"loader": DIAG}, {"loader": DIAG}]}}
    sup = supervisor_from(config_text({"c": compose}))
    with pytest.raises(ModeLoadError, match="task 'echo' is defined by both"):
        sup.switch_mode("c").result(T)


# ----------------------------------------------------------------- with a GPU, seen through a stand-in NVML


class _LiveGpu(FakeNvml):
    """An NVML stand-in whose memory follows real processes: each held pid
    shows its bytes while it lives and for ``lag`` seconds after it is gone,
    as a driver frees a dead process's memory a little after the exit."""

    def __init__(self, lag: float):
        super().__init__([{}])
        self.base, self.lag = FakeNvml([{}]).gpus[0]["used"], lag
        self.held: dict[int, int] = {}
        self.gone_at: dict[int, float] = {}

    def _gpu(self, handle, call):
        gpu = super()._gpu(handle, call)
        now = time.monotonic()
        for pid in self.held:
            if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                self.gone_at.setdefault(pid, now)
        live = {pid: b for pid, b in self.held.items() if now < self.gone_at.get(pid, now + 1) + self.lag}
        gpu["Compute"] = list(live.items())
        gpu["used"] = self.base + sum(live.values())
        return gpu


def _gpu_supervisor(supervisor_from, **settings):
    """A supervisor pinned to the stand-in GPU, with two diag modes to switch
    between, and the pid of a first worker already running in ``diag``."""
    sup = supervisor_from(config_text(TWO_DIAGS, supervisor={"device": "cuda:0", **settings}))
    return sup, sup.submit("pid", mode="diag").result(T)


@pytest.mark.process
def test_with_a_gpu_status_and_switches_carry_nvml_figures_and_wait_for_the_memory(fake_nvml, supervisor_from):
    """The real loop, real workers and the real reclaim wait; only the driver
    is a stand-in (this machine has no GPU): it keeps a dead worker's 512 MiB
    "used" for 0.5 s, and the next worker must not start before it is back."""
    live = fake_nvml(_LiveGpu(lag=0.5))
    sup, pid = _gpu_supervisor(supervisor_from, heartbeat_interval=0.1, heartbeat_timeout=5)
    live.held[pid] = 512 * MiB
    wait_until(lambda: sup.status()["worker_vram_bytes"] == 512 * MiB, T, "a heartbeat's NVML sample")
    status = sup.status()
    assert status["device"] == "cuda:0" and status["gpu_unavailable"] is None
    assert status["gpu"]["used_bytes"] == live.base + 512 * MiB and status["gpu"]["name"] == "Fake GPU 0"
    result = sup.switch_mode("other").result(T)
    assert result["previous_pid"] == pid and result["reclaim_complete"] is True
    assert result["reclaimed_bytes"] == 512 * MiB and result["vram_used_after"] == live.base
    assert result["reclaim_seconds"] >= 0.5  # it waited out the driver's lag
    # The new worker began after the memory was back: both times on the
    # kernel's boot clock (wall-clock create_time can be skewed by /proc's btime).
    freed = time.clock_gettime(time.CLOCK_BOOTTIME) - (time.monotonic() - (live.gone_at[pid] + live.lag))
    with open(f"/proc/{sup.status()['worker_pid']}/stat") as f:
        started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    assert started >= freed - 0.02  # clock ticks are 10 ms


@pytest.mark.process
def test_the_loop_keeps_serving_while_a_switch_waits_for_memory(fake_nvml, supervisor_from):
    live = fake_nvml(_LiveGpu(lag=1.5))
    sup, pid = _gpu_supervisor(supervisor_from)
    live.held[pid] = 128 * MiB
    switching = sup.switch_mode("other")
    wait_until(lambda: sup.status()["reclaiming"], T, "the switch to wait for the memory")
    status = sup.status()
    assert status["worker_pid"] is None and status["switching_to"] == "other"
    turned = sup._engine.published_at
    wait_until(lambda: sup._engine.published_at > turned, 1.0, "the loop to turn during the wait")
    assert switching.result(T)["reclaim_complete"] is True and not sup.status()["reclaiming"]


@pytest.mark.process
def test_a_reclaim_that_never_completes_is_reported_not_fatal(fake_nvml, supervisor_from):
    live = fake_nvml(_LiveGpu(lag=3600))  # a leak, as far as the meter can tell
    sup, pid = _gpu_supervisor(supervisor_from, reclaim_timeout=0.5)
    live.held[pid] = 256 * MiB
    result = sup.switch_mode("other").result(T)
    assert result["reclaim_complete"] is False and result["reclaimed_bytes"] == 0
    assert sup.submit("echo", "still serving").result(T) == "still serving"


@pytest.mark.unit
def test_out_of_memory_is_recognised_in_a_chain_and_by_older_torchs_words():
    from worker.memory import is_out_of_memory

    def raised(outer: Exception, inner: Exception) -> Exception:
        try:
            try:
                raise inner
            except Exception:  # noqa: BLE001 - any: it becomes the context
                raise outer  # noqa: B904 - the implicit __context__ is the point
        except Exception as exc:  # noqa: BLE001
            return exc

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(raised(ValueError("wrapped"), MemoryError()))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))
