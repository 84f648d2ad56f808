"""float32 array round trips: ``submit("echo", arr)`` in mode diag returns
the array, which crosses the process boundary twice as a raw ZeroMQ frame
(docs/protocol.md, section 3.1). Throughput in GB/s counts both directions
(2 x size / time), the median of REPS round trips.

Baselines, measured interleaved with it (one round trip of each way per
repetition, all three processes up at once):

* ``multiprocessing.Pipe`` with pickle protocol 5 and out-of-band buffers
  (the header and the raw buffer sent as two messages, ``send_bytes`` of the
  array's own memory): the best the standard library's pipe can do;
* a raw zero-copy pyzmq echo: ``send(memoryview, copy=False)`` both ways, the
  child wraps the frame with ``np.frombuffer`` and sends it back: the floor.

64 MiB is the protocol's frame limit, and exactly 64 MiB is allowed."""

from __future__ import annotations

import contextlib
import pickle
import subprocess
import time

import numpy as np
import zmq

from bench.common import child, ipc_endpoint, pipe_child
from bench.report import Row, median, progress
from supervisor import Supervisor

MIB = 2**20
SIZES = {1: 40, 16: 12, 64: 7}  # MiB -> timed repetitions
WARMUP = 2
GOAL_MIB = 64

_ZMQ_ECHO = """
import sys, zmq, numpy as np
ctx = zmq.Context(); s = ctx.socket(zmq.PAIR); s.setsockopt(zmq.LINGER, 0); s.connect(sys.argv[1])
s.send(b"hello")
while True:
    f = s.recv(copy=False)
    if len(f) == 4 and f.bytes == b"stop": break
    a = np.frombuffer(f.buffer, dtype=np.float32)
    s.send(a, copy=False)
s.close(); ctx.term()
"""


_PIPE_ECHO = """
import pickle, sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
while True:
    try:
        header = conn.recv_bytes()
    except EOFError:
        break
    arr = pickle.loads(header, buffers=[conn.recv_bytes()])
    buffers = []
    conn.send_bytes(pickle.dumps(arr, protocol=5, buffer_callback=buffers.append))
    for b in buffers:
        conn.send_bytes(b.raw())
"""


def _pipe_send(conn, arr) -> None:
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(arr, protocol=5, buffer_callback=buffers.append)
    conn.send_bytes(header)
    for b in buffers:
        conn.send_bytes(b.raw())


def _pipe_recv(conn):
    header = conn.recv_bytes()
    return pickle.loads(header, buffers=[conn.recv_bytes()])  # noqa: S301 - our own child


class Ways:
    """The three echoes, up at once, so their round trips can interleave.
    Everything started is stopped and reaped on the way out (ExitStack)."""

    def __enter__(self) -> Ways:
        self._stack = contextlib.ExitStack()
        try:
            self.sup = Supervisor().start()
            self._stack.callback(self.sup.shutdown)
            self.sup.switch_mode("diag").result(60)
            self.parent = self._stack.enter_context(pipe_child(_PIPE_ECHO))
            self.ctx = zmq.Context()
            self._stack.callback(self.ctx.term)
            self.pair = self.ctx.socket(zmq.PAIR)
            self._stack.callback(self.pair.close)
            self.pair.setsockopt(zmq.LINGER, 0)
            endpoint = ipc_endpoint("arrays.sock")
            self.pair.bind(endpoint)
            self.zmq_proc = self._stack.enter_context(child(_ZMQ_ECHO, endpoint))
            self._stack.callback(self._ask_zmq_child_to_stop)  # runs first (LIFO), then child() reaps it
            assert self.pair.recv() == b"hello"
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _ask_zmq_child_to_stop(self) -> None:
        try:
            self.pair.send(b"stop", flags=zmq.NOBLOCK)
            self.zmq_proc.wait(5)
        except (zmq.ZMQError, subprocess.TimeoutExpired):
            pass  # child() terminates it

    def gpuvisor(self, arr):
        return self.sup.submit("echo", arr).result(120)

    def pipe(self, arr):
        _pipe_send(self.parent, arr)
        return _pipe_recv(self.parent)

    def zmq(self, arr):
        self.pair.send(memoryview(arr), copy=False)
        return np.frombuffer(self.pair.recv(copy=False).buffer, dtype=np.float32)


def run() -> list[Row]:
    gbps: dict[int, dict[str, float]] = {}
    with Ways() as ways:
        names = {"gpuvisor": ways.gpuvisor, "pipe": ways.pipe, "zmq": ways.zmq}
        for mib, reps in SIZES.items():
            arr = np.random.default_rng(mib).random(mib * MIB // 4, dtype=np.float32)
            for name, way in names.items():  # correct before fast
                back = way(arr)
                assert isinstance(back, np.ndarray) and back.dtype == np.float32, (name, type(back))
                assert np.array_equal(back, arr), f"{name}: the array came back different"
                del back
            times: dict[str, list[float]] = {name: [] for name in names}
            for rep in range(WARMUP + reps):
                for name, way in names.items():
                    t = time.perf_counter()
                    back = way(arr)
                    seconds = time.perf_counter() - t
                    del back
                    if rep >= WARMUP:
                        times[name].append(seconds)
            gbps[mib] = {name: 2 * mib * MIB / median(t) / 1e9 for name, t in times.items()}
            progress(
                f"arrays {mib} MiB: "
                + ", ".join(
                    f"{name} {v:.2f} GB/s ({median(times[name]) * 1e3:.1f} ms)" for name, v in gbps[mib].items()
                )
            )
    rows = []
    for mib in SIZES:
        g = gbps[mib]
        note = f"2 x {mib} MiB / median of {SIZES[mib]} round trips; GB = 1e9 bytes" if mib == 1 else ""
        goal = {"limit": 2} if mib == GOAL_MIB else {}
        rows.append(
            Row(
                f"array echo {mib} MiB float32, Supervisor",
                g["gpuvisor"],
                "mp.Pipe, pickle 5 out-of-band",
                g["pipe"],
                "GB/s",
                higher_is_better=True,
                note=note,
                **goal,
            )
        )
        rows.append(
            Row(
                f"array echo {mib} MiB float32, Supervisor",
                g["gpuvisor"],
                "raw zero-copy pyzmq echo",
                g["zmq"],
                "GB/s",
                higher_is_better=True,
            )
        )
    return rows
