"""A gpuvisor worker written from docs/protocol.md alone.

It imports nothing from gpuvisor: only the standard library, pyzmq and
msgpack. It proves the protocol document is enough to write a worker that
the real supervisor drives like its own.

It never imports the loader named in LOAD. Whatever the loader string, it
serves a tiny built-in task table, except that the loader ``foreign:fail``
makes the load fail (LOAD_FAILED with ``mode_load_error``, then exit 3).

Threads: the main thread owns the DEALER (ZeroMQ sockets are not
thread-safe) and does all the I/O, heartbeats included. Jobs run one at a
time on a job thread, which hands each encoded answer back over an inproc
PAIR socket that the main thread polls alongside the DEALER.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import signal
import sys
import threading
import time
import traceback

import msgpack
import zmq

VERSION = 1
MAX_FRAME = 64 * 1024 * 1024  # a frame over this is refused, and never sent
LINGER_MS = 5000

EXIT_DRAINED = 0
EXIT_LOAD_FAILED = 3
EXIT_DISCONNECTED = 4
EXIT_ORPHANED = 70

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

PIPE = "inproc://foreign-worker-answers"


# --------------------------------------------------------------- tasks


def _echo(payload):
    return payload


def _pid(payload):
    return os.getpid()


def _add(payload):
    return payload["a"] + payload["b"]


class Boom(Exception):
    """What the ``boom`` task raises, so its type name is recognisable."""


def _boom(payload):
    raise Boom(f"boom on purpose: {payload!r}")


def _sleep(payload):
    time.sleep(float(payload["seconds"]))
    return None


TASKS = {"echo": _echo, "pid": _pid, "add": _add, "boom": _boom, "sleep": _sleep}


class LoadError(Exception):
    pass


def load(loader: str, args: dict) -> dict:
    """The stand-in for importing ``loader`` and calling it with ``args``."""
    if loader == "foreign:fail":
        raise LoadError(f"loader {loader!r} fails on purpose")
    return dict(TASKS)


# --------------------------------------------------------------- wire


def log(gen: int, text: str) -> None:
    line = " ".join(str(text).split())  # one line, always
    print(f"foreign_worker[g{gen} pid {os.getpid()}]: {line}", file=sys.stderr, flush=True)


def encode(kind: str, **fields) -> bytes:
    """One frame; raises (TypeError, ValueError, OverflowError) if a value
    cannot be msgpack-encoded, ValueError if the frame is over the limit."""
    frame = msgpack.packb({"v": VERSION, "k": kind, **fields}, use_bin_type=True)
    if len(frame) > MAX_FRAME:
        raise ValueError(f"encoded {kind} is {len(frame)} bytes, over the {MAX_FRAME}-byte limit")
    return frame


def error_map(code: str, message: str, exc: BaseException | None = None) -> dict:
    err = {"code": code, "message": " ".join(message.split()) or code}
    if exc is not None:
        err["remote_type"] = type(exc).__name__
        err["traceback"] = "".join(traceback.format_exception(exc))
    return err


def _refuse_ext(code, data):
    raise ValueError(f"ext type {code} refused")


class Malformed(Exception):
    pass


def _no_ext_anywhere(value) -> None:
    # msgpack decodes the timestamp ext (-1) itself, without the ext_hook.
    if isinstance(value, msgpack.Timestamp | msgpack.ExtType):
        raise Malformed("ext types are refused")
    if isinstance(value, list):
        for item in value:
            _no_ext_anywhere(item)
    elif isinstance(value, dict):
        for k, item in value.items():
            _no_ext_anywhere(k)
            _no_ext_anywhere(item)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELDS = {
    # kind: {field: check}
    "load": {
        "mode": lambda x: isinstance(x, str),
        "loader": lambda x: isinstance(x, str),
        "args": lambda x: isinstance(x, dict),
    },
    "job": {"job": _is_int, "task": lambda x: isinstance(x, str), "payload": lambda x: True},
    "drain": {},
}


def decode(frames: list[bytes]) -> dict:
    """A supervisor → worker message, checked; raises Malformed."""
    if len(frames) != 1:
        raise Malformed(f"{len(frames)} frames, expected exactly 1")
    frame = frames[0]
    if len(frame) > MAX_FRAME:
        raise Malformed(f"frame of {len(frame)} bytes is over the limit")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=False, ext_hook=_refuse_ext)
    except Exception as exc:  # noqa: BLE001 - any undecodable frame is just logged
        raise Malformed(f"not msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(msg, dict):
        raise Malformed(f"not a map but {type(msg).__name__}")
    if not all(isinstance(k, str) for k in msg):
        raise Malformed("a top-level key is not a string")
    _no_ext_anywhere(msg)
    v = msg.get("v")
    if not _is_int(v) or v != VERSION:
        raise Malformed(f"protocol version {v!r}, this worker speaks {VERSION}")
    kind = msg.get("k")
    if not isinstance(kind, str) or kind not in FIELDS:
        raise Malformed(f"unknown kind {kind!r}")
    for name, ok in FIELDS[kind].items():
        if name not in msg:
            raise Malformed(f"{kind} lacks field {name!r}")
        if not ok(msg[name]):
            raise Malformed(f"{kind} field {name!r} has the wrong type {type(msg[name]).__name__}")
    return msg


# --------------------------------------------------------------- job thread


def job_thread(ctx: zmq.Context, jobs: queue.Queue, tasks: dict) -> None:
    """Runs jobs in order; sends each encoded answer to the main thread."""
    pipe = ctx.socket(zmq.PAIR)
    pipe.setsockopt(zmq.LINGER, 0)
    pipe.connect(PIPE)
    while True:
        msg = jobs.get()
        if msg is None:  # the main thread is exiting
            pipe.close()
            return
        pipe.send(answer(msg, tasks))


# Deliberate protocol violations, not part of any mode's task table: the
# supervisor's tests send these task names to see how it defends itself.
MISBEHAVIOURS = {
    "misbehave_garbage": lambda job_id: b"\xc1 this is not msgpack",
    "misbehave_oversized": lambda job_id: b"\x00" * (MAX_FRAME + 1),
    "misbehave_huge": lambda job_id: b"\x00" * (MAX_FRAME + 1024 * 1024),
    # A map key msgpack carries but a decoder making lists of arrays cannot use.
    "misbehave_tuple_key": lambda job_id: encode("result", job=job_id, value={(1, 2): "x"}),
    "misbehave_odd_error": lambda job_id: encode(
        "failure", job=job_id, error={"code": "job_failed", "message": "odd", "self": 1, "cls": "x"}
    ),
}


def answer(msg: dict, tasks: dict) -> bytes:
    """The one encoded RESULT or FAILURE for a JOB; never raises."""
    job_id, task, payload = msg["job"], msg["task"], msg["payload"]
    if task in MISBEHAVIOURS:
        return MISBEHAVIOURS[task](job_id)
    handler = tasks.get(task)
    if handler is None:
        err = error_map("unknown_task", f"no task {task!r} in this mode; it has {sorted(tasks)}")
        return encode("failure", job=job_id, error=err)
    try:
        value = handler(payload)
    except BaseException as exc:  # noqa: BLE001 - a handler's error goes back to the caller
        err = error_map("job_failed", f"{type(exc).__name__}: {exc}", exc)
    else:
        try:
            return encode("result", job=job_id, value=value)
        except Exception as exc:  # noqa: BLE001 - an unsendable result becomes a failure
            err = error_map("job_failed", f"the result of {task!r} cannot be sent: {type(exc).__name__}: {exc}", exc)
    try:
        return encode("failure", job=job_id, error=err)
    except Exception as exc:  # noqa: BLE001 - e.g. a traceback over the limit: send less
        message = f"{err['message'][:1000]} (full error not sendable: {type(exc).__name__})"
        return encode("failure", job=job_id, error={"code": "job_failed", "message": message})


# --------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="A gpuvisor worker written from docs/protocol.md alone.")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--gen", required=True, type=int)
    p.add_argument("--parent-pid", required=True, type=int)
    p.add_argument("--heartbeat-interval", required=True, type=float)
    args = p.parse_args(argv)
    if args.gen <= 0:
        p.error("--gen must be a positive integer")
    if not args.heartbeat_interval > 0:
        p.error("--heartbeat-interval must be a positive number of seconds")
    return args


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    check_parent(parent_pid)


def check_parent(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        os._exit(EXIT_ORPHANED)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent(args.parent_pid)  # first thing that does anything
    gen, interval = args.gen, args.heartbeat_interval

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, f"g{gen}".encode("ascii"))
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.SNDTIMEO, 3000)  # a send that cannot complete: the connection is lost (doc section 2)
    dropped = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # a lost connection is fatal (doc section 2)
    sock.connect(args.endpoint)
    pipe = ctx.socket(zmq.PAIR)
    pipe.setsockopt(zmq.LINGER, 0)
    pipe.bind(PIPE)

    jobs: queue.Queue = queue.Queue()
    worker: threading.Thread | None = None

    def close_and_exit(code: int) -> int:
        if worker is not None:
            jobs.put(None)
            worker.join()
        pipe.close(linger=0)
        sock.disable_monitor()
        dropped.close(linger=0)
        sock.close(linger=LINGER_MS)  # flushes the last message
        ctx.term()
        return code

    def send(frame: bytes) -> None:
        try:
            sock.send(frame)
        except zmq.Again:  # SNDTIMEO passed: nobody is there to take it
            log(gen, "could not send to the supervisor; exiting")
            os._exit(EXIT_DISCONNECTED)

    send(encode("hello", pid=os.getpid(), gen=gen))

    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(pipe, zmq.POLLIN)
    poller.register(dropped, zmq.POLLIN)

    tasks: dict | None = None
    loaded_mode: str | None = None
    in_flight = 0  # jobs handed to the job thread and not yet answered
    draining = False
    next_beat = time.monotonic() + interval

    while True:
        now = time.monotonic()
        if now >= next_beat:
            check_parent(args.parent_pid)
            send(encode("heartbeat", busy=in_flight > 0))
            next_beat = now + interval
        if draining and in_flight == 0:
            return close_and_exit(EXIT_DRAINED)
        timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000)) + 1
        ready = dict(poller.poll(timeout_ms))

        if dropped in ready:
            log(gen, "the supervisor dropped the connection; exiting")
            os._exit(EXIT_DISCONNECTED)
        if pipe in ready:
            send(pipe.recv())  # an answer from the job thread, already encoded
            in_flight -= 1

        if sock not in ready:
            continue
        frames = sock.recv_multipart()
        try:
            msg = decode(frames)
        except Malformed as exc:
            log(gen, f"malformed message ignored: {exc}")
            continue
        kind = msg["k"]

        if kind == "drain":
            draining = True  # finish what we hold, then exit 0
        elif draining:
            log(gen, f"{kind} ignored: draining")
        elif kind == "load":
            if tasks is not None or loaded_mode is not None:
                log(gen, f"second load ignored: mode {loaded_mode!r} is loaded, {msg['mode']!r} asked for")
                continue
            loaded_mode = msg["mode"]
            start = time.monotonic()
            try:
                tasks = load(msg["loader"], msg["args"])
            except Exception as exc:  # noqa: BLE001 - any loader error is reported
                err = error_map("mode_load_error", f"loading {msg['mode']!r} failed: {type(exc).__name__}: {exc}", exc)
                send(encode("load_failed", mode=msg["mode"], error=err))
                return close_and_exit(EXIT_LOAD_FAILED)
            send(encode("ready", mode=msg["mode"], load_seconds=time.monotonic() - start, tasks=sorted(tasks)))
            worker = threading.Thread(target=job_thread, args=(ctx, jobs, tasks), name="job", daemon=True)
            worker.start()
        elif kind == "job":
            if tasks is None:
                log(gen, f"job {msg['job']} ignored: no mode loaded yet")
                continue
            in_flight += 1
            jobs.put(msg)


if __name__ == "__main__":
    sys.exit(main())
