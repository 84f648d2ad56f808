"""The loop's rules, driven one message at a time by a scripted peer.

The supervisor spawns a worker process that only sleeps (its
``worker_command``); this test connects to the supervisor's socket under
that worker's routing id and speaks the worker's side of the protocol by
hand, as vLLM's in-process client drives its engine. So the order of what
the loop sends, and what it does with each answer, is observed exactly,
with no handler timing in the way. The process is real: killing it is how
a death is made."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq

from protocol import Drain, Hello, Job, Load, Ready, Result, decode_to_worker, encode
from supervisor import JobTimeout, Supervisor
from tests.helpers import T, pid_gone, wait_until
from tests.helpers.config import config_text

pytestmark = pytest.mark.process

SLEEPER = "import time; time.sleep(600)"
DEAF = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def config(write_config, code: str = SLEEPER, **settings) -> Path:
    """Two modes whose worker runs ``code`` instead of a worker: the peer speaks for it."""
    supervisor = {"worker_command": [sys.executable, "-c", code], "heartbeat_timeout": 60.0, "warm_standby": False,
                  "stop_timeout": 2.0, **settings}  # fmt: skip
    return write_config(config_text({"m": "x.y:z", "n": "x.y:z"}, supervisor=supervisor))


class Peer:
    """The worker side of one generation, spoken from this thread."""

    def __init__(self, ctx: zmq.Context, gen: int):
        self.gen = gen
        proc = wait_until(lambda: _child_with_gen(gen), T, f"worker process gen {gen}")
        argv = proc.cmdline()
        self.pid = proc.pid
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, f"g{gen}".encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(argv[argv.index("--endpoint") + 1])
        self.send(Hello(self.pid, gen))

    def send(self, msg) -> None:
        self.sock.send_multipart(encode(msg))

    def recv(self):
        assert self.sock.poll(T * 1000), f"nothing from the supervisor for gen {self.gen} within {T}s"
        return decode_to_worker(self.sock.recv_multipart())

    def quiet(self, seconds: float = 0.3) -> bool:
        return not self.sock.poll(seconds * 1000)

    def load(self, mode: str) -> None:
        msg = self.recv()
        assert isinstance(msg, Load) and msg.mode == mode
        self.send(Ready(mode, 0.0, ["echo"]))


def _child_with_gen(gen: int) -> psutil.Process | None:
    for p in psutil.Process().children(recursive=True):
        try:
            argv = p.cmdline()
        except psutil.Error:
            continue
        if "--gen" in argv and argv[argv.index("--gen") + 1] == str(gen):
            return p
    return None


class Peers:
    """Opens peers on one context and closes their sockets at the end, even
    after a failed assertion (``term()`` would wait for them forever)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.open: list[Peer] = []

    def __call__(self, gen: int) -> Peer:
        peer = Peer(self.ctx, gen)
        self.open.append(peer)
        return peer


@pytest.fixture
def peer():
    peers = Peers()
    yield peers
    for p in peers.open:
        p.sock.close(linger=0)
    peers.ctx.term()


def test_jobs_before_a_switch_run_in_the_old_mode_and_after_it_in_the_new(write_config, peer):
    with Supervisor(config(write_config)) as sup:
        sup.switch_mode("m")
        first = peer(1)
        first.load("m")
        before = sup.submit("echo", "before")
        switched = sup.switch_mode("n")
        after = sup.submit("echo", "after")
        job = first.recv()
        assert isinstance(job, Job) and job.payload == "before"
        assert first.quiet(), "nothing more may go to the old worker: a barrier comes next"
        first.send(Result(job.job, "done in m"))
        assert before.result(T) == "done in m"
        wait_until(lambda: pid_gone(first.pid), T, "the old worker to be stopped and reaped")
        second = peer(2)
        second.load("n")
        assert switched.result(T)["previous"] == "m"
        job = second.recv()
        assert job.payload == "after"
        second.send(Result(job.job, "done in n"))
        assert after.result(T) == "done in n"


def test_a_window_hands_that_many_jobs_over_before_any_answer(write_config, peer):
    with Supervisor(config(write_config, window=3)) as sup:
        sup.switch_mode("m")
        worker = peer(1)
        worker.load("m")
        futures = [sup.submit("echo", i) for i in range(5)]
        sent = [worker.recv() for _ in range(3)]
        assert [j.payload for j in sent] == [0, 1, 2] and worker.quiet()
        worker.send(Result(sent[0].job, "a"))
        assert worker.recv().payload == 3  # one answer frees one place
        assert futures[0].result(T) == "a"
        sup.shutdown(drain=False)


def test_a_job_past_its_timeout_kills_the_worker_and_gets_job_timeout(write_config, peer):
    with Supervisor(config(write_config)) as sup:
        sup.switch_mode("m")
        worker = peer(1)
        worker.load("m")
        stuck = sup.submit("echo", 1, timeout=0.3)
        worker.recv()
        with pytest.raises(JobTimeout, match="ran past its 0.3s timeout"):
            stuck.result(T)
        assert pid_gone(worker.pid)


def test_an_answer_that_comes_in_the_turn_its_deadline_passes_is_the_jobs_outcome(write_config, peer):
    """The answer arrives a little before the job's deadline but takes the
    loop past it to read (4 million empty arrays: most of a second). The
    deadline phase of that same turn then finds nothing running: on main it
    took the minimum of nothing and the loop crashed, which any caller could
    do on purpose (an echo of nested arrays, a timeout just after it)."""
    with Supervisor(config(write_config)) as sup:
        sup.switch_mode("m")
        worker = peer(1)
        worker.load("m")
        future = sup.submit("echo", "x", timeout=1.0)
        job = worker.recv()
        received = time.monotonic()
        # Packed by hand, before the clock runs down (encode() would also check it by decoding it).
        answer = [msgpack.packb({"v": 1, "k": "result", "job": job.job, "value": [[[]] * 1_000_000] * 4})]
        time.sleep(max(0.0, received + 0.8 - time.monotonic()))
        worker.sock.send_multipart(answer)  # 0.2 s before the deadline; read past it
        assert len(future.result(T)) == 4, "the answer, not a timeout"
        assert sup.status()["state"] == "running" and sup.status()["worker_pid"] == worker.pid
        after = sup.submit("echo", "after")  # the same worker, the loop turning
        job = worker.recv()
        worker.send(Result(job.job, "after"))
        assert after.result(T) == "after"


def test_the_loop_keeps_serving_while_a_worker_ignores_sigterm(write_config, peer):
    """Stopping is a state with a deadline, not a wait: while the old worker
    ignores SIGTERM, status() moves and commands are taken; SIGKILL follows
    at stop_timeout, and then the switch goes on."""
    with Supervisor(config(write_config, code=DEAF)) as sup:
        sup.switch_mode("m")
        first = peer(1)
        first.load("m")
        wait_until(lambda: sup.status()["worker_state"] == "ready", T, "the first worker to be ready")
        wait_until(lambda: _ignores_sigterm(first.pid), T, "the worker process to ignore SIGTERM")
        switched = sup.switch_mode("n")
        wait_until(lambda: sup.status()["worker_state"] == "stopping", T, "the old worker to be stopping")
        queued = sup.submit("echo", "taken while stopping")
        wait_until(lambda: sup.status()["queued"] == 1, T, "the job to be queued while the worker stops")
        assert sup.status()["worker_state"] == "stopping" and not pid_gone(first.pid)
        second = peer(2)  # after SIGKILL at stop_timeout
        assert pid_gone(first.pid)
        second.load("n")
        assert switched.result(T)["stop_seconds"] >= 2.0
        job = second.recv()
        second.send(Result(job.job, job.payload))
        assert queued.result(T) == "taken while stopping"


def test_shutdown_sends_drain_and_waits_for_the_exit(write_config, peer):
    sup = Supervisor(config(write_config, code=DEAF)).start()
    sup.switch_mode("m")
    worker = peer(1)
    worker.load("m")
    started = time.monotonic()
    stopper = __import__("threading").Thread(target=sup.shutdown)
    stopper.start()
    assert isinstance(worker.recv(), Drain)
    os.kill(worker.pid, signal.SIGKILL)  # as a worker that drained would exit
    stopper.join(T)
    assert not stopper.is_alive() and time.monotonic() - started < T
    assert sup.status()["state"] == "stopped"


def _ignores_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        ignored = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    return bool(int(ignored, 16) & (1 << (signal.SIGTERM - 1)))
