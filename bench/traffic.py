"""A service's traffic: several callers, two modes, small jobs.

* **Alternating modes.** 2 callers each submit 40 jobs alternating ``diag``
  (echo) and ``embed`` (one sentence), at once, then wait for all; against
  the same 80 jobs grouped by mode (40 diag, then 40 embed) from one caller.
  Both start from diag loaded with the spare ready. Goal: <= 1.3 x. A strict
  FIFO pays a switch for nearly every job (30 to 40 x when measured).
* **Batched embedding.** 8 concurrent callers each submit 250 one-sentence
  ``embed`` jobs at once (a service's clients firing requests), against the
  same with the embed handler's batching turned off in the config
  (``batch = { embed = { max_batch = 1 } }``): throughput ratio, goal >= 5 x;
  and against calling the model directly in one process with batches of 64
  (the fastest any caller could do by hand): goal >= 0.7 x. The model
  called directly one sentence at a time is printed too: 64 at a time
  against one at a time is the most batching can give on this machine.
* **The starvation bound.** One caller keeps ``diag`` busy (4 jobs of 10 ms
  always waiting) while another sends one ``embed`` job at a time, pausing
  0.5 s between them. The longest any job waited (submit to result) against
  ``max_wait_s`` + the slowest switch seen + the slowest job. Swept over
  ``max_wait_s`` to pick its default: a shorter bound switches more often,
  which costs the busy mode throughput (printed beside each).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import time
from concurrent.futures import Future

from bench import lifecycle
from bench.common import child, config
from bench.report import Row, progress
from supervisor import Supervisor

ALTERNATING_JOBS = 40  # per caller
CALLERS = 8
EMBED_JOBS = 250  # per caller
DIRECT_BATCH = 64
MIXED_SECONDS = 12.0
MAX_WAITS = (0.5, 1.0, 2.0, 5.0)
SENTENCE = "the supervisor keeps GPU work in a child process it can kill"


def _job(n: int) -> tuple[str, object, str]:
    """The n-th job of the alternating load: (task, payload, mode)."""
    if n % 2:
        return "embed", {"texts": [f"{SENTENCE} ({n})"]}, "embed"
    return "echo", n, "diag"


def _ready(sup: Supervisor) -> None:
    """diag loaded and the spare done importing: the same start for every run."""
    sup.switch_mode("diag").result(600)
    lifecycle.wait_ready(sup)


def alternating() -> tuple[float, int]:
    """(seconds, switches) for 2 callers x 40 jobs alternating modes."""
    with Supervisor(config(max_queue=100_000)) as sup:
        _ready(sup)
        gen = sup.status()["generation"]
        futures: list[Future] = []
        lock = threading.Lock()
        gate = threading.Barrier(3)

        def caller() -> None:
            gate.wait()
            mine = [sup.submit(task, payload, mode=mode) for task, payload, mode in map(_job, range(ALTERNATING_JOBS))]
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=caller) for _ in range(2)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        gate.wait()
        for t in threads:
            t.join()
        for f in futures:
            f.result(600)
        seconds = time.perf_counter() - t0
        assert len(futures) == 2 * ALTERNATING_JOBS
        return seconds, sup.status()["generation"] - gen


def grouped() -> tuple[float, int]:
    """The same 80 jobs from one caller, 40 diag then 40 embed."""
    jobs = [_job(n) for _ in range(2) for n in range(ALTERNATING_JOBS)]
    jobs.sort(key=lambda job: job[2] != "diag")
    with Supervisor(config(max_queue=100_000)) as sup:
        _ready(sup)
        gen = sup.status()["generation"]
        t0 = time.perf_counter()
        futures = [sup.submit(task, payload, mode=mode) for task, payload, mode in jobs]
        for f in futures:
            f.result(600)
        return time.perf_counter() - t0, sup.status()["generation"] - gen


def _embed_config(batching: bool):
    base = config(max_queue=100_000)
    if batching:
        return base
    spec = base.modes["embed"]
    modes = {**base.modes, "embed": dataclasses.replace(spec, batch={"embed": {"max_batch": 1}})}
    return dataclasses.replace(base, modes=modes)


def embedding(batching: bool) -> tuple[float, dict]:
    """(jobs/s, the status' batch figures) for 8 callers x 250 sentences."""
    with Supervisor(_embed_config(batching)) as sup:
        sup.switch_mode("embed").result(600)
        sup.submit("embed", {"texts": ["warm"]}).result(60)
        futures: list[Future] = []
        lock = threading.Lock()
        gate = threading.Barrier(CALLERS + 1)

        def caller(c: int) -> None:
            gate.wait()
            mine = [sup.submit("embed", {"texts": [f"{SENTENCE} ({c}, {n})"]}) for n in range(EMBED_JOBS)]
            with lock:
                futures.extend(mine)

        threads = [threading.Thread(target=caller, args=(c,)) for c in range(CALLERS)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        gate.wait()
        for t in threads:
            t.join()
        vectors = [f.result(600) for f in futures]
        seconds = time.perf_counter() - t0
        assert len(vectors) == CALLERS * EMBED_JOBS
        return len(vectors) / seconds, dict(sup.status()["batches"])


_DIRECT = """
import json, sys, time
import worker.modes.embed as e
texts, size = json.loads(sys.stdin.read()), int(sys.argv[1])
embed = e.load(device="cpu")["embed"]
call = (lambda p: embed([p])[0]) if hasattr(embed, "gpuvisor_batch") else embed
call({"texts": texts[:size]})
t = time.perf_counter()
for i in range(0, len(texts), size):
    call({"texts": texts[i:i + size]})
print(json.dumps(len(texts) / (time.perf_counter() - t)))
"""


def direct(size: int = DIRECT_BATCH) -> float:
    """Sentences/s calling the model in one warm process, ``size`` at a time."""
    texts = [f"{SENTENCE} ({c}, {n})" for c in range(CALLERS) for n in range(EMBED_JOBS)]
    with child(_DIRECT, str(size), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        out, _ = proc.communicate(json.dumps(texts), timeout=600)
    return json.loads(out.strip().splitlines()[-1])


def mixed(max_wait: float) -> dict:
    """The starvation load under ``max_wait``: the longest wait of each
    mode's jobs, the switches' and jobs' longest times, diag's throughput."""
    with Supervisor(config(max_wait_s=max_wait, max_queue=100_000)) as sup:
        _ready(sup)
        gen = sup.status()["generation"]
        stop = threading.Event()
        waits: dict[str, list[float]] = {"diag": [], "embed": []}
        lock = threading.Lock()

        def timed(task: str, payload, mode: str) -> Future:
            t = time.perf_counter()
            future = sup.submit(task, payload, mode=mode)

            def done(_):
                with lock:
                    waits[mode].append(time.perf_counter() - t)

            future.add_done_callback(done)
            return future

        def busy() -> None:
            window: list[Future] = []
            while not stop.is_set():
                window.append(timed("sleep", {"seconds": 0.01}, "diag"))
                if len(window) >= 4:
                    window.pop(0).result(600)
            for f in window:
                f.result(600)

        def rare() -> None:
            n = 0
            while not stop.is_set():
                timed("embed", {"texts": [f"{SENTENCE} ({n})"]}, "embed").result(600)
                n += 1
                stop.wait(0.5)

        threads = [threading.Thread(target=busy), threading.Thread(target=rare)]
        for t in threads:
            t.start()
        time.sleep(MIXED_SECONDS)
        stop.set()
        for t in threads:
            t.join()
        switches = sup.status()["generation"] - gen
    # A job's own run: the embed of one sentence, measured alone on a warm worker.
    return {
        "max_wait": max_wait,
        "longest_diag": max(waits["diag"]),
        "longest_embed": max(waits["embed"]),
        "diag_jobs_per_s": len(waits["diag"]) / MIXED_SECONDS,
        "embed_jobs": len(waits["embed"]),
        "switches": switches,
    }


def _slowest_switch_and_job() -> tuple[float, float]:
    """A warm switch to embed and back (the spare ready), and the slowest
    single job of the mixed load (one sentence, or a 10 ms sleep)."""
    with Supervisor(config()) as sup:
        _ready(sup)
        t = time.perf_counter()
        sup.switch_mode("embed").result(600)
        switch = time.perf_counter() - t
        job = 0.0
        for _ in range(5):
            t = time.perf_counter()
            sup.submit("embed", {"texts": [SENTENCE]}).result(60)
            job = max(job, time.perf_counter() - t)
    return switch, max(job, 0.01)


def run() -> list[Row]:
    rows = []
    progress("traffic: 2 callers x 40 jobs alternating diag and embed ...")
    alt_s, alt_switches = alternating()
    grouped_s, grouped_switches = grouped()
    rows.append(Row(
        "2 callers x 40 jobs alternating diag/embed (s)", alt_s, "the same jobs grouped by mode", grouped_s, "s",
        limit=1.3, note=f"switches: {alt_switches} alternating, {grouped_switches} grouped",
    ))  # fmt: skip

    progress("traffic: 8 callers x 250 one-sentence embed jobs, batched and not ...")
    batched, batches = embedding(True)
    unbatched, _ = embedding(False)
    by_hand = direct()
    one_by_one = direct(1)
    mean = batches["jobs"] / batches["count"] if batches["count"] else 0.0
    rows.append(Row(
        "8 callers x 250 embed, batched (jobs/s)", batched, "unbatched", unbatched, "jobs/s",
        limit=5.0, higher_is_better=True,
        note=(f"{batches['count']} batches, mean {mean:.1f} jobs, largest {batches['largest']}; the most batching "
              f"can give here: the model directly, 64 at a time vs one, {by_hand / one_by_one:.2f}x"),
        extra={**batches, "direct_64": by_hand, "direct_1": one_by_one},
    ))  # fmt: skip
    rows.append(Row(
        "8 callers x 250 embed, batched (jobs/s)", batched, "the model called directly, batches of 64", by_hand,
        "jobs/s", limit=0.7, higher_is_better=True,
    ))  # fmt: skip

    progress("traffic: the starvation bound, max_wait_s swept ...")
    switch, job = _slowest_switch_and_job()
    default = config().max_wait_s
    sweep = {w: mixed(w) for w in sorted({*MAX_WAITS, default})}
    for w, m in sweep.items():
        longest = max(m["longest_diag"], m["longest_embed"])
        rows.append(Row(
            f"mixed load, max_wait_s={w:g}: longest wait (s)", longest, "max_wait_s + a switch + a job",
            w + switch + job, "s", limit=1.0,
            note=(f"diag {m['longest_diag']:.2f}s, embed {m['longest_embed']:.2f}s longest; "
                  f"diag {m['diag_jobs_per_s']:.0f} jobs/s, {m['embed_jobs']} embed jobs, {m['switches']} switches"
                  + (" (the default)" if w == default else "")),
            extra=m,
        ))  # fmt: skip
    return rows
