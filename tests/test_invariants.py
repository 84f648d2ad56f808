"""The invariants from the architecture brief, each tested for real:
the supervisor never imports torch; nothing on a socket is pickled; every
process we spawn is reaped; a worker dies when its supervisor dies."""

from __future__ import annotations

import signal
import sys

import psutil
import pytest

from supervisor import Supervisor
from tests.helpers import T, run_python, wait_until
from tests.helpers.config import DIAG, config_text
from tests.helpers.script import read_line, supervisor_script

pytestmark = pytest.mark.process

DIAG_AND_HANGS = config_text({"diag": DIAG, "hangs": "tests.helpers.loaders:hangs"})


def not_running(pid: int) -> bool:
    """Dead, or a zombie waiting for whoever adopted it: either way it holds
    no memory and no VRAM. (Reaping orphans is init's job, not ours.)"""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_the_supervisor_never_imports_torch_even_while_running_the_torch_mode():
    """numpy is the one exception, and only once an array has arrived: the
    embed mode answers with one, which the supervisor hands over as numpy."""
    with supervisor_script(
        """
        with Supervisor() as sup:
            sup.submit("echo", {"x": [1.5]}, mode="diag").result(60)
            before = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "numpy", "worker"))
            sup.switch_mode("embed").result(120)
            vectors = sup.submit("embed", {"texts": ["hello"]}).result(60)
            heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "worker"))
            print(json.dumps({"shape": list(vectors.shape), "before": before, "heavy": heavy}), flush=True)
        """
    ) as proc:
        out = read_line(proc)
        assert proc.wait(T) == 0
    assert out["shape"] == [1, 384]
    assert out["before"] == [], "the supervisor imported heavy modules before any array reached it"
    assert out["heavy"] == [], "the supervisor process imported heavy or worker-side modules"


def test_importing_every_supervisor_module_pulls_in_no_torch():
    code = (
        "import sys, supervisor, supervisor.api, supervisor.engine.loop, supervisor.service.cli, supervisor.service.tour,"
        " supervisor.client, supervisor.service.daemon;"
        "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'worker')])"
    )
    out = run_python(code)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("moment", ["idle", "mid_job", "loading"])
def test_a_worker_dies_when_its_supervisor_is_killed(moment, helper_loaders, write_config):
    path = write_config(DIAG_AND_HANGS)
    with supervisor_script(
        f"""
        sup = Supervisor({str(path)!r}).start()
        moment = {moment!r}
        if moment == "loading":
            sup.switch_mode("hangs")
            while sup.status()["worker_state"] != "loading":
                time.sleep(0.01)
            pid = sup.status()["worker_pid"]
        else:
            sup.switch_mode("diag").result(60)
            pid = sup.submit("pid").result(60)
            if moment == "mid_job":
                sup.submit("sleep", {{"seconds": 600}})
                while sup.status()["in_flight"] < 1:
                    time.sleep(0.01)
        print(json.dumps({{"worker": pid}}), flush=True)
        time.sleep(600)
        """
    ) as proc:
        worker = read_line(proc)["worker"]
        assert psutil.pid_exists(worker) and not not_running(worker)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(T) == -signal.SIGKILL
        wait_until(lambda: not_running(worker), 10, f"orphaned worker {worker} to die")


def test_a_program_that_forgets_shutdown_still_leaves_no_worker():
    with supervisor_script(
        """
        sup = Supervisor()
        sup.switch_mode("diag").result(60)
        print(json.dumps({"worker": sup.submit("pid").result(60)}), flush=True)
        """
    ) as proc:
        worker = read_line(proc)["worker"]
        assert proc.wait(T) == 0
        assert not_running(worker)


def test_every_worker_is_reaped_at_once_not_only_at_shutdown():
    me = psutil.Process()
    with Supervisor() as sup:
        pids = []
        for _ in range(5):
            sup.switch_mode("diag").result(T)
            pids.append(sup.submit("pid").result(T))
            sup.submit("crash", {"how": "kill"}).exception(T)
        sup.switch_mode("diag").result(T)
        live = sup.submit("pid").result(T)
        children = me.children(recursive=True)
        assert {c.pid for c in children} == {live, sup.status()["standby_pid"]} - {None}, (
            "only the current worker and the warm standby may exist: no zombies, no strays"
        )
        assert all(not psutil.pid_exists(p) for p in pids)
    assert me.children(recursive=True) == []


def test_every_frame_the_supervisor_sends_decodes_as_a_protocol_message(capfd):
    """The worker decodes each frame with the typed msgpack decoder and logs
    any frame that is not a versioned msgpack map (a pickle included, see
    test_worker). A full workload with no such line means every frame the
    supervisor sent was msgpack."""
    with Supervisor() as sup:
        sup.switch_mode("diag").result(T)
        payloads = [None, 1, -(2**63), 2**64 - 1, 1.5, "text", b"\x80\x04bytes", [1, [2, [3]]], {"k": {"n": [b"", ""]}}]
        for p in payloads:
            assert sup.submit("echo", p).result(T) == p
        sup.submit("fail").exception(T)
        sup.submit("nope").exception(T)
    err = capfd.readouterr().err
    assert "dropped a malformed message" not in err
    assert "ignored" not in err


WRAPPED = [
    "/bin/sh",
    "-c",
    '"$0" "$@"; exit $?',  # runs the worker as a child of sh, not in its place
    sys.executable,
    "-m",
    "worker",
]


def test_a_worker_command_wrapper_that_does_not_exec_works_and_still_dies_with_the_supervisor(write_config):
    path = write_config(config_text(supervisor={"worker_command": WRAPPED, "heartbeat_interval": 0.2}))
    with Supervisor(path) as sup:  # the wrapper case works at all
        result = sup.switch_mode("diag").result(T)
        worker = sup.submit("pid").result(T)
        assert psutil.Process(worker).ppid() == result["pid"] != worker, "the worker runs under the wrapper"
    with supervisor_script(
        f"""
        sup = Supervisor({str(path)!r}).start()
        sup.switch_mode("diag").result(60)
        print(json.dumps({{"worker": sup.submit("pid").result(60), "wrapper": sup.status()["worker_pid"]}}), flush=True)
        time.sleep(600)
        """
    ) as proc:
        pids = read_line(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(T)
        wait_until(lambda: not_running(pids["worker"]), 10, "the wrapped worker to notice its supervisor died")
        wait_until(lambda: not_running(pids["wrapper"]), 10, "the wrapper to go with the worker's group")


def _maps_torch(pid: int) -> bool:
    return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())


@pytest.mark.slow
def test_a_worker_imports_torch_only_when_its_mode_does():
    with Supervisor() as sup:
        sup.switch_mode("diag").result(T)
        diag = sup.submit("pid").result(T)
        assert not _maps_torch(diag), "the diag worker must not load torch"
        embed = sup.switch_mode("embed").result(3 * T)["pid"]
        assert _maps_torch(embed), "the embed worker runs torch (this proves the check can see it)"


@pytest.mark.parametrize("sig, moment", [
    (signal.SIGTERM, "switching"),
    (signal.SIGTERM, "mid_job"),
    (signal.SIGINT, "mid_job"),
    (signal.SIGINT, "loading"),
    (signal.SIGINT, "switching"),
])  # fmt: skip
def test_sigterm_or_sigint_to_the_supervisor_leaves_no_child_behind(sig, moment, helper_loaders, write_config):
    """SIGTERM's default action ends the process (PDEATHSIG then takes the
    worker); SIGINT raises KeyboardInterrupt, the program ends, and the
    atexit hook stops and reaps the worker itself."""
    path = write_config(DIAG_AND_HANGS)
    with supervisor_script(
        f"""
        sup = Supervisor({str(path)!r}).start()
        moment = {moment!r}
        sup.switch_mode("diag").result(60)
        pids = [sup.submit("pid").result(60)]
        if moment == "mid_job":
            job = sup.submit("sleep", {{"seconds": 600}})
            while sup.status()["in_flight"] < 1:
                time.sleep(0.01)
        else:  # loading, or switching: the new worker loads while the old one was stopped
            job = sup.switch_mode("hangs")
            while sup.status()["worker_state"] != "loading":
                time.sleep(0.01)
            pids.append(sup.status()["worker_pid"])
        print(json.dumps({{"workers": pids}}), flush=True)
        job.result()  # blocks in the main thread, where SIGINT lands
        """
    ) as proc:
        workers = read_line(proc)["workers"]
        proc.send_signal(sig)
        code = proc.wait(T)
        assert code != 0
        for pid in workers:
            wait_until(lambda p=pid: not_running(p), 10, f"worker {pid} to be gone after {sig.name}")


def test_how_fast_an_orphan_dies(capsys):
    """Not a timed assertion: the figure for the docs, printed (pytest -s)."""
    import time as _time

    with supervisor_script(
        """
        sup = Supervisor().start()
        sup.switch_mode("diag").result(60)
        print(json.dumps({"worker": sup.submit("pid").result(60)}), flush=True)
        time.sleep(600)
        """
    ) as proc:
        worker = read_line(proc)["worker"]
        started = _time.monotonic()
        proc.send_signal(signal.SIGKILL)
        wait_until(lambda: not_running(worker), 10, "the orphan to die")
        with capsys.disabled():
            print(f"\norphan: worker gone {1000 * (_time.monotonic() - started):.0f} ms after its supervisor's SIGKILL")
